"""Scaling over fake CPU devices: step time, tokens/s and compile time for 1, 2, 4, 8 devices.

The same global batch is trained on meshes of 1, 2, 4 and 8 devices (FSDP and data-parallel
layouts). On a 2-core CPU the fake devices share the same cores, so this measures the overhead
of sharding (collectives, partitioned compilation), not speedup: the reference is the 1-device
run, and a ratio near 1.0 means sharding costs little.

    python benchmarks/scaling.py [--steps 8] [--out benchmarks/results/scaling.json]

Each mesh runs in its own subprocess because JAX fixes the device count at import.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import load_average, machine  # this folder (a script's own is on sys.path)

SHAPE = ["model.hidden_size=256", "model.intermediate_size=688", "model.num_layers=4",
         "model.num_heads=8", "model.num_kv_heads=8", "model.vocab_size=4096"]
BATCH, SEQ = 8, 256
LAYOUTS = {"data": "mesh.data={n} mesh.fsdp=1 mesh.tensor=1", "fsdp": "mesh.data=1 mesh.fsdp={n} mesh.tensor=1"}


def _measure(n: int, layout: str, steps: int) -> dict:
    """Runs inside the subprocess: compile once, then time `steps` train steps."""
    import functools

    import jax
    import numpy as np

    from alpaca_jax import sharding
    from alpaca_jax.config import load_config
    from alpaca_jax.model import Llama, logical_axes
    from alpaca_jax.train import (create_train_state, learning_rate_schedule, make_optimizer,
                                  state_shardings, train_step)

    cfg = load_config(None, SHAPE + LAYOUTS[layout].format(n=n).split())
    mesh = sharding.make_mesh(cfg.mesh)
    schedule = learning_rate_schedule(cfg.optimizer, 1000)
    optimizer = make_optimizer(cfg.optimizer, schedule, logical_axes(cfg.model))
    shardings = state_shardings(cfg.model, optimizer, mesh, cfg.mesh.rules)
    state = create_train_state(cfg.model, optimizer, jax.random.key(0), shardings)
    batch_sh = sharding.batch_sharding(mesh, cfg.mesh.rules, leading=1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.model.vocab_size, (1, BATCH, SEQ)).astype(np.int32)
    batch = {"input_ids": ids, "targets": ids, "loss_mask": np.ones((1, BATCH, SEQ), np.float32),
             "segment_ids": np.ones((1, BATCH, SEQ), np.int32),
             "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (1, BATCH, SEQ)).copy()}
    batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
    step = jax.jit(functools.partial(train_step, model=Llama(cfg.model), optimizer=optimizer, schedule=schedule),
                   in_shardings=(shardings, batch_sh), out_shardings=(shardings, sharding.replicated(mesh)),
                   donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    return {"devices": n, "layout": layout, "compile_s": compile_s, "step_s_median": median,
            "step_s_all": times, "tokens_per_second": BATCH * SEQ / median,
            "loss": float(metrics["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/scaling.json")
    parser.add_argument("--child", nargs=2, metavar=("DEVICES", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    load_before = load_average()
    if args.child:
        print(json.dumps(_measure(int(args.child[0]), args.child[1], args.steps)))
        return
    results = []
    for layout in LAYOUTS:
        for n in (1, 2, 4, 8):
            env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", str(n), layout],
                                 env=env, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(row)
            print(f"{layout:5s} {n} devices: compile {row['compile_s']:.1f}s, step {row['step_s_median'] * 1000:.0f} ms, "
                  f"{row['tokens_per_second']:.0f} tok/s, loss {row['loss']:.5f}", flush=True)
    base = {r["layout"]: r for r in results if r["devices"] == 1}
    for r in results:
        r["tokens_per_second_vs_1_device"] = r["tokens_per_second"] / base[r["layout"]]["tokens_per_second"]
    import jax
    report = {"benchmark": "scaling", "command": "python benchmarks/scaling.py", "shape": SHAPE,
              "batch": BATCH, "seq": SEQ, "results": results,
              "machine": machine(load_before, jax=jax.__version__),
              "gpu_mfu": "not measured: no GPU was lent to this session"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
