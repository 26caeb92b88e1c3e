"""Subprocess worker for the sharding tests (JAX must see fake devices before it is imported).

    XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_dump_to=RUN_ROOT/hlo --xla_dump_hlo_module_re=train_step" \
        python tests/mesh_worker.py meshes OUT.json RUN_ROOT
    python tests/mesh_worker.py process OUT.json RUN_DIR      (one of several processes; JAX_* env)
    XLA_FLAGS=... python tests/mesh_worker.py lora OUT.json RUN_ROOT   (LoRA: 1 device vs FSDP over 8)
    XLA_FLAGS=... python tests/mesh_worker.py preference OUT.json RUN_ROOT   (DPO: 1 device vs 2x2x2, fused)

Trains the tiny model for a few steps per mesh and writes the logged losses and the observed
parameter shardings as JSON. Three of the meshes train with the fused Pallas kernel (run by the
Pallas interpreter on CPU) under shard_map; for each run the all-gathers in its compiled train
step (XLA's dump, when XLA_FLAGS asks for one) are listed, and on each of those meshes the
wrapped kernel's values and gradients are compared with `xla` attention's.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax import sharding
from alpaca_jax.config import load_config
from alpaca_jax.model import logical_axes
from alpaca_jax.train import read_metrics, train

# Four optimizer steps with the full learning rate from the first one (no warmup), so every
# mesh is compared after real updates, not only at the initial parameters.
STEPS = 4
COMMON = [f"train.max_steps={STEPS}", "train.log_every=1", "train.batch_size=8", "data.max_len=128",
          "optimizer.warmup_steps=0", "optimizer.learning_rate=3e-3",
          "train.progress_bar=false", "run.tensorboard=false", "model.num_layers=2",
          "data.eval_fraction=0.2", "train.eval_every=2"]  # held-out loss: sharded like training
MESHES = {"1": (1, 1, 1), "8x1x1": (8, 1, 1), "1x8x1": (1, 8, 1), "2x2x2": (2, 2, 2), "1x4x2": (1, 4, 2)}
# Meshes that train with the fused kernel wrapped in shard_map (the others: auto, chunked on CPU).
FUSED_MESHES = ("8x1x1", "1x8x1", "2x2x2")


def _run(overrides, devices=None):
    cfg = load_config(None, COMMON + overrides)
    result = train(cfg, devices=devices)
    return cfg, result


def _sharding_report(cfg, state):
    """Per parameter: expected mesh spec from the rules, actual spec, and one shard's shape."""
    report = {}
    specs = logical_axes(cfg.model)
    flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_params = dict(jax.tree_util.tree_leaves_with_path(state.params))
    for path, spec in flat_specs:
        array = flat_params[path]
        expected = sharding.logical_to_mesh(spec, cfg.mesh.rules)
        report[jax.tree_util.keystr(path)] = {
            "expected": [list(a) if isinstance(a, tuple) else a for a in expected],
            "actual": [list(a) if isinstance(a, tuple) else a for a in array.sharding.spec],
            "global_shape": list(array.shape),
            "shard_shape": list(array.addressable_shards[0].data.shape),
        }
    return report


def _all_gathers(hlo_dir: Path, seen: set[Path]) -> list[list[int]] | None:
    """Result shapes of every all-gather in the train steps XLA compiled since the last call
    (files not in `seen`); None when XLA dumps nothing (XLA_FLAGS without --xla_dump_to)."""
    if not hlo_dir.is_dir():
        return None
    new = [p for p in sorted(hlo_dir.glob("*train_step*after_optimizations.txt")) if p not in seen]
    seen.update(new)
    return [shape for path in new for shape in _gathered_shapes(path.read_text())] if new else None


def _gathered_shapes(hlo: str) -> list[list[int]]:
    """The result shape of every all-gather in an HLO module's text."""
    return [[int(d) for d in dims.split(",") if d]
            for dims in re.findall(r"= \w+\[([\d,]*)\][^\n]*? all-gather(?:-start)?\(", hlo)]


def _bare_kernel_gathers(mesh_shape: tuple[int, int, int], rules) -> list[list[int]]:
    """The all-gathers of the Pallas kernel called WITHOUT shard_map on q/k/v sharded by the
    rules (the negative control of the train-step check: XLA gathers a kernel call's inputs)."""
    from alpaca_jax.model.fused_attention import pallas_flash_attention

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(mesh_shape), sharding.MESH_AXES)
    q_spec = sharding.logical_to_mesh(jax.sharding.PartitionSpec("batch", "length", "heads", "head_dim"), rules)
    placed = lambda shape, spec, dtype=jnp.float32: jax.ShapeDtypeStruct(
        shape, dtype, sharding=jax.sharding.NamedSharding(mesh, spec))
    args = (placed((8, 64, 4, 32), q_spec), placed((8, 64, 2, 32), q_spec), placed((8, 64, 2, 32), q_spec),
            placed((8, 64), jax.sharding.PartitionSpec(q_spec[0], None), jnp.int32))
    grads = jax.grad(lambda q, k, v, s: jnp.sum(pallas_flash_attention(q, k, v, s, interpret=True)), argnums=(0, 1, 2))
    return _gathered_shapes(jax.jit(grads).lower(*args).compile().as_text())


def _packed_segments(rows: int, length: int, rng) -> np.ndarray:
    """[rows, length] segment ids: four examples of random lengths per row, then padding (0)."""
    segments = np.zeros((rows, length), np.int32)
    for row in range(rows):
        cuts = sorted(rng.choice(np.arange(1, length - 8), 3, replace=False))
        end = length - int(rng.integers(0, 8))
        for segment, (start, stop) in enumerate(zip([0, *cuts], [*cuts, end]), start=1):
            segments[row, start:stop] = segment
    return segments


def _fused_vs_xla(mesh_shape: tuple[int, int, int], rules) -> dict:
    """Largest |difference| between the shard_map-wrapped Pallas kernel (interpreted) and xla
    attention on `mesh_shape`, in the output and in each of the q/k/v gradients: packed rows,
    GQA 4:2, fp32."""
    from alpaca_jax.model.attention import attend

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(mesh_shape), sharding.MESH_AXES)
    layout = sharding.attention_layout(mesh, rules)
    rows, length, heads, kv_heads, head_dim = 8, 64, 4, 2, 32
    keys = jax.random.split(jax.random.key(0), 4)
    query = jax.random.normal(keys[0], (rows, length, heads, head_dim))
    key, value = (jax.random.normal(k, (rows, length, kv_heads, head_dim)) for k in keys[1:3])
    cotangent = jax.random.normal(keys[3], query.shape)
    segments = jnp.asarray(_packed_segments(rows, length, np.random.default_rng(0)))

    def value_and_grads(implementation):
        def loss(q, k, v):
            out = attend(q, k, v, segments, implementation, layout)
            return jnp.sum(out * cotangent), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(query, key, value)
        return [np.asarray(x) for x in (out, *grads)]

    fused, xla = value_and_grads("pallas_flash"), value_and_grads("xla")
    return {"max_abs_diff": [float(np.max(np.abs(a - b))) for a, b in zip(fused, xla)],
            "max_abs": [float(np.max(np.abs(b))) for b in xla]}


def meshes(out: Path, root: Path) -> None:
    results = {}
    tokenizer = root / "1" / "tokenizer"
    hlo_dir, seen = root / "hlo", set()
    for name, (data, fsdp, tensor) in MESHES.items():
        overrides = [f"run.dir={root / name}", f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"]
        if name != "1":
            overrides.append(f"tokenizer.path={tokenizer}")  # same tokenizer as the 1-device run
        if name in FUSED_MESHES:
            overrides.append("model.attention=pallas_flash")
        devices = jax.devices()[:data * fsdp * tensor]
        cfg, result = _run(overrides, devices)
        results[name] = {"attention": cfg.model.attention, "all_gathers": _all_gathers(hlo_dir, seen),
                         "losses": [m["loss"] for m in read_metrics(result.run_dir)],
                         "grad_norms": [m["grad_norm"] for m in read_metrics(result.run_dir)],
                         "learning_rates": [m["learning_rate"] for m in read_metrics(result.run_dir)],
                         "eval_losses": [m["eval_loss"] for m in read_metrics(result.run_dir) if "eval_loss" in m],
                         "params": _sharding_report(cfg, result.state)}
        if name in FUSED_MESHES:
            results[name]["fused_vs_xla"] = _fused_vs_xla((data, fsdp, tensor), cfg.mesh.rules)
        if name == "2x2x2":
            results[name]["bare_kernel_gathers"] = _bare_kernel_gathers((data, fsdp, tensor), cfg.mesh.rules)
    out.write_text(json.dumps(results))


LORA = ["lora.rank=4", "lora.dropout=0.1", "lora.target_modules=[q,k,v,o,gate,up,down]",
        "optimizer.learning_rate=1e-2"]


def lora(out: Path, root: Path) -> None:
    """LoRA with dropout, on one device and fully sharded over eight: losses and adapter placement."""
    results = {}
    for name, fsdp in (("1", 1), ("1x8x1", 8)):
        overrides = [f"run.dir={root / name}", "mesh.data=1", f"mesh.fsdp={fsdp}", "mesh.tensor=1", *LORA]
        if name != "1":
            overrides.append(f"tokenizer.path={root / '1' / 'tokenizer'}")
        cfg, result = _run(overrides, jax.devices()[:fsdp])
        wq_a = result.state.params["layers_0"]["attention"]["wq_lora_a"]
        results[name] = {"losses": [m["loss"] for m in read_metrics(result.run_dir)],
                         "grad_norms": [m["grad_norm"] for m in read_metrics(result.run_dir)],
                         "wq_lora_a": {"spec": [a for a in wq_a.sharding.spec],
                                       "shard_shape": list(wq_a.addressable_shards[0].data.shape)},
                         "base_wq_shard": list(result.base["layers_0"]["attention"]["wq"].addressable_shards[0].data.shape)}
    out.write_text(json.dumps(results))
def _record_writes(under: Path) -> list[str]:
    """Names of files under `under` that this process opens for writing from Python (an audit
    hook sees every `open`), to check which process writes the run's logs."""
    written: list[str] = []
    root = str(under.resolve())

    def hook(event, args):
        if event == "open" and isinstance(args[0], str) and args[0].startswith(root):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR)):
                written.append(os.path.relpath(args[0], root))

    sys.addaudithook(hook)
    return written


def process(out: Path, run_dir: Path, extra: list[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    written = _record_writes(run_dir)
    cfg, result = _run([f"run.dir={run_dir}", *extra])
    out.write_text(json.dumps({"process": jax.process_index(), "count": jax.process_count(),
                               "devices": jax.device_count(), "last_loss": result.last_loss,
                               "written": sorted(set(written))}))


def preference(out: Path, root: Path) -> None:
    """DPO (a frozen copy of the start as the reference) on one device, and on data 2 x fsdp 2 x
    tensor 2 with the fused Pallas kernel under shard_map: losses, DPO metrics, and every
    attention choice logged (a fallback to xla would be a warning)."""
    import logging

    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "cat", "dog", "tree", "sun", "moon", "rain", "snow", "fish", "bird"]
    rows = []
    for _ in range(32):
        a, b, c = rng.choice(words, 3, replace=False).tolist()
        rows.append({"prompt": f"List {a}, {b} and {c}.", "chosen": f"{a}, {b}, {c}.", "rejected": f"{c}! {b}! {a}!"})
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("alpaca_jax").addHandler(handler)
    logging.getLogger("alpaca_jax").setLevel(logging.INFO)
    results = {}
    for name, (data, fsdp, tensor) in (("1", (1, 1, 1)), ("2x2x2", (2, 2, 2))):
        messages.clear()
        overrides = [f"run.dir={root / name}", f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}",
                     f"data.train_files=[{pairs}]", "data.max_len=48", "preference.beta=0.1",
                     "optimizer.learning_rate=1e-3", "data.eval_fraction=0.0", "train.eval_every=null"]
        if name != "1":
            overrides += [f"tokenizer.path={root / '1' / 'tokenizer'}", "model.attention=pallas_flash"]
        cfg, result = _run(overrides, jax.devices()[:data * fsdp * tensor])
        records = read_metrics(result.run_dir)
        results[name] = {"losses": [m["loss"] for m in records],
                         "margins": [m["rewards/margins"] for m in records],
                         "grad_norms": [m["grad_norm"] for m in records],
                         "attention": [m for m in messages if m.startswith("attention:")]}
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    mode, out, where = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "meshes":
        meshes(out, where)
    elif mode == "lora":
        lora(out, where)
    elif mode == "preference":
        preference(out, where)
    else:
        process(out, where, sys.argv[4:])
