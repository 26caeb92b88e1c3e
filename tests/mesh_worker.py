"""Subprocess worker for the sharding tests (JAX must see fake devices before it is imported).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_worker.py meshes OUT.json RUN_ROOT
    python tests/mesh_worker.py process OUT.json RUN_DIR      (one of several processes; JAX_* env)

Trains the tiny model for a few steps per mesh and writes the logged losses and the observed
parameter shardings as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax

from alpaca_jax import sharding
from alpaca_jax.config import load_config
from alpaca_jax.model import logical_axes
from alpaca_jax.train import read_metrics, train

# Four optimizer steps with the full learning rate from the first one (no warmup), so every
# mesh is compared after real updates, not only at the initial parameters.
STEPS = 4
COMMON = [f"train.max_steps={STEPS}", "train.log_every=1", "train.batch_size=8", "data.max_len=128",
          "optimizer.warmup_steps=0", "optimizer.learning_rate=3e-3",
          "train.progress_bar=false", "run.tensorboard=false", "model.num_layers=2"]
MESHES = {"1": (1, 1, 1), "8x1x1": (8, 1, 1), "1x8x1": (1, 8, 1), "2x2x2": (2, 2, 2), "1x4x2": (1, 4, 2)}


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


def meshes(out: Path, root: Path) -> None:
    results = {}
    tokenizer = root / "1" / "tokenizer"
    for name, (data, fsdp, tensor) in MESHES.items():
        overrides = [f"run.dir={root / name}", f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"]
        if name != "1":
            overrides.append(f"tokenizer.path={tokenizer}")  # same tokenizer as the 1-device run
        devices = jax.devices()[:data * fsdp * tensor]
        cfg, result = _run(overrides, devices)
        results[name] = {"losses": [m["loss"] for m in read_metrics(result.run_dir)],
                         "grad_norms": [m["grad_norm"] for m in read_metrics(result.run_dir)],
                         "learning_rates": [m["learning_rate"] for m in read_metrics(result.run_dir)],
                         "params": _sharding_report(cfg, result.state)}
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


if __name__ == "__main__":
    mode, out, where = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "meshes":
        meshes(out, where)
    else:
        process(out, where, sys.argv[4:])
