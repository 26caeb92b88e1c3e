"""Full fine-tuning vs LoRA on a bf16 base vs QLoRA on an NF4 base: step time and memory.

One run, one process, the same model shape and batch for all three, each built and stepped by
the library's own functions (the adapters' train state, the frozen base, `train_step`):

- step time: median of interleaved timed steps (one of each variant per round, so that CPU
  contention from other processes hits all three alike), compile excluded;
- peak memory, measured: XLA's buffer assignment for the compiled step (arguments + outputs +
  temporaries - donated aliases), plus on a GPU the allocator's `peak_bytes_in_use` after the
  timed steps; beside it the planner's prediction (`alpaca_jax.train.plan.plan_memory(...).total`);
- the planner's per-device figures for LLaMA-7B (configs/alpaca_7b.yaml, alpaca_lora_7b.yaml,
  qlora_7b.yaml) on one 24 GB GPU and on one 80 GB GPU, and the issue's two targets: LoRA's
  trainable state (adapters + gradients + Adam) under 2% of full fine-tuning's, and QLoRA's
  frozen base at most 0.3x the bf16 base.

    python benchmarks/lora.py            # default (~2-3 min on 2 CPU cores)
    python benchmarks/lora.py --quick    # a smoke run: smaller shape, 2 timed steps

Writes benchmarks/results/lora.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax import sharding
from alpaca_jax.config import config_from_dict, load_config
from alpaca_jax.model import Llama
from alpaca_jax.train.plan import parse_bytes, plan_memory
from alpaca_jax.train import adapters
from alpaca_jax.train.optim import learning_rate_schedule, make_optimizer
from alpaca_jax.train.state import create_train_state, fresh_train_state, state_shardings
from alpaca_jax.train.step import train_step

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "benchmarks" / "results" / "lora.json"
SHAPE = {"vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1408, "num_layers": 8,
         "num_heads": 8, "num_kv_heads": 8, "attention": "chunked", "scan_layers": False}
QUICK_SHAPE = {**SHAPE, "hidden_size": 256, "intermediate_size": 704, "num_layers": 2, "vocab_size": 2048,
               "num_heads": 4, "num_kv_heads": 4}
ALL_TARGETS = "[q,k,v,o,gate,up,down]"
VARIANTS = {
    "full fine-tuning (fp32 weights)": [],
    "LoRA r8 q,v on a bf16 base": ["lora.rank=8", "lora.alpha=16", "lora.target_modules=[q,v]",
                                   "lora.base_dtype=bfloat16"],
    "QLoRA r64 all linear on an NF4 base": ["lora.rank=64", "lora.alpha=16", f"lora.target_modules={ALL_TARGETS}",
                                            "lora.base_dtype=bfloat16", "lora.quantize=nf4", "lora.block_size=64"],
}
SEVEN_B = {"full fine-tuning": ("alpaca_7b.yaml", ["mesh.fsdp=1", "train.grad_accum=32"]),
           "LoRA (alpaca_lora_7b)": ("alpaca_lora_7b.yaml", []),
           "QLoRA (qlora_7b)": ("qlora_7b.yaml", [])}


def _config(shape: dict, extra: list[str], batch: int, seq: int):
    model = [f"model.{k}={v}" for k, v in shape.items()]
    return config_from_dict({}, model + [f"train.batch_size={batch}", f"data.max_len={seq}",
                                         "mesh.data=1", *extra])


class Variant:
    """A train state, (LoRA) a frozen base, and the jitted step, as train/loop.py builds them."""

    def __init__(self, cfg, mesh):
        self.cfg = cfg
        schedule = learning_rate_schedule(cfg.optimizer, 1000)
        optimizer = make_optimizer(cfg.optimizer, schedule, adapters.trainable_layout(cfg)[1])
        shardings = state_shardings(cfg.model, optimizer, mesh, cfg.mesh.rules, cfg.lora)
        self.base_args, base_sh = (), ()
        if cfg.lora is None:
            self.state = create_train_state(cfg.model, optimizer, jax.random.key(0), shardings)
        else:
            base_sh = (adapters.base_shardings(cfg.model, cfg.lora, mesh, cfg.mesh.rules),)
            self.base_args = (adapters.frozen_base(cfg, base_sh[0]),)
            self.state = jax.jit(lambda p: fresh_train_state(p, optimizer), out_shardings=shardings)(
                adapters.initial_adapters(cfg, shardings.params))
        batch_sh = sharding.batch_sharding(mesh, cfg.mesh.rules, leading=1)
        self.step_fn = jax.jit(
            functools.partial(train_step, model=Llama(cfg.model, cfg.lora), optimizer=optimizer, schedule=schedule),
            in_shardings=(shardings, batch_sh, *base_sh), out_shardings=(shardings, sharding.replicated(mesh)),
            donate_argnums=0)

    def compiled_bytes(self, batch) -> int:
        analysis = self.step_fn.lower(self.state, batch, *self.base_args).compile().memory_analysis()
        return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                   + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)

    def step(self, batch) -> float:
        start = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, batch, *self.base_args)
        jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - start


def _batch(cfg, batch: int, seq: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(4, cfg.model.vocab_size, (1, batch, seq + 1)).astype(np.int32)
    ones = np.ones((1, batch, seq), np.int32)
    return {"input_ids": jnp.asarray(ids[..., :-1]), "targets": jnp.asarray(ids[..., 1:]),
            "loss_mask": jnp.asarray(ones, jnp.float32), "segment_ids": jnp.asarray(ones),
            "positions": jnp.asarray(np.broadcast_to(np.arange(seq), (1, batch, seq)).astype(np.int32))}


def measure(shape: dict, batch: int, seq: int, steps: int) -> dict:
    mesh = sharding.make_mesh(config_from_dict({}).mesh, jax.devices()[:1])
    variants = {name: Variant(_config(shape, extra, batch, seq), mesh) for name, extra in VARIANTS.items()}
    data = _batch(next(iter(variants.values())).cfg, batch, seq)
    results = {}
    for name, v in variants.items():
        plan = plan_memory(v.cfg, 1)
        results[name] = {"compiled_step_bytes": v.compiled_bytes(data), "planned_bytes": plan.total,
                         "planned": {"frozen": plan.frozen, "trainable": plan.params, "gradients": plan.grads,
                                     "optimizer": plan.optimizer, "activations": plan.activations},
                         "trainable_params": plan.trainable_params, "total_params": plan.total_params,
                         "first_step_s": v.step(data), "step_s": []}
    for _ in range(steps):                      # interleaved rounds
        for name, v in variants.items():
            results[name]["step_s"].append(v.step(data))
    device = jax.devices()[0]
    for name, r in results.items():
        r["median_step_s"] = statistics.median(r["step_s"])
        r["tokens_per_s"] = batch * seq / r["median_step_s"]
    if device.platform == "gpu":  # the allocator's peak; per variant needs one process each, so: overall
        stats = device.memory_stats() or {}
        results["gpu_peak_bytes_in_use_all_variants"] = stats.get("peak_bytes_in_use")
    return results


def seven_b() -> dict:
    out = {}
    for name, (file, overrides) in SEVEN_B.items():
        cfg = load_config(REPO / "configs" / file, overrides)
        plan = plan_memory(cfg, 1)
        out[name] = {"config": f"configs/{file} {' '.join(overrides)}".strip(),
                     "frozen": plan.frozen, "trainable": plan.params, "gradients": plan.grads,
                     "optimizer": plan.optimizer, "activations": plan.activations, "total": plan.total,
                     "trainable_params": plan.trainable_params, "total_params": plan.total_params,
                     "fits_24GB": plan.total <= parse_bytes("24GB"), "fits_80GB": plan.total <= parse_bytes("80GB")}
    full, lora, qlora = out["full fine-tuning"], out["LoRA (alpaca_lora_7b)"], out["QLoRA (qlora_7b)"]
    state = lambda r: r["trainable"] + r["gradients"] + r["optimizer"]
    out["targets"] = {"lora_trainable_state_vs_full": state(lora) / state(full),
                      "qlora_frozen_vs_bf16_base": qlora["frozen"] / lora["frozen"]}
    return out


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shape and 2 timed steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 4, quick 2)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    shape = QUICK_SHAPE if args.quick else SHAPE
    batch, seq = (2, 128) if args.quick else (4, 256)
    steps = args.steps or (2 if args.quick else 4)
    report = {"shape": shape, "batch": batch, "seq_len": seq, "timed_steps": steps,
              "device": str(jax.devices()[0].device_kind), "cpu": _cpu_model(),
              "variants": measure(shape, batch, seq, steps), "llama_7b_planner_one_device": seven_b()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    gib = lambda b: f"{b / 2**30:.3f} GiB"
    for name, r in report["variants"].items():
        if isinstance(r, dict):
            print(f"{name:40s} step {r['median_step_s']:.3f} s  compiled {gib(r['compiled_step_bytes'])}  "
                  f"planned {gib(r['planned_bytes'])}  trainable {r['trainable_params']:,}/{r['total_params']:,}")
    for name, r in report["llama_7b_planner_one_device"].items():
        if name != "targets":
            print(f"7B {name:24s} frozen {gib(r['frozen'])} trainable {gib(r['trainable'])} grads {gib(r['gradients'])} "
                  f"adam {gib(r['optimizer'])} act {gib(r['activations'])} total {gib(r['total'])} "
                  f"24GB:{r['fits_24GB']} 80GB:{r['fits_80GB']}")
    print("targets:", report["llama_7b_planner_one_device"]["targets"])
    return report


if __name__ == "__main__":
    main()
