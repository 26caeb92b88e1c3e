"""The README's first command, timed: `alpaca-jax train configs/tiny.yaml` on the embedded default.

    python benchmarks/tiny_job.py [--out benchmarks/results/tiny_job.json]

Runs the real CLI in a fresh run directory (a temporary one, so no earlier run is resumed), then
reads its `metrics.jsonl` and `summary.json`. Reports the wall time of the whole command (imports,
tokenizer training, compile and training) and the first and last logged losses: the job's
promise is that the loss at least halves within a few minutes on 2 CPU cores. Installing is not
included (pip's time depends on its cache and the network).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import load_average, machine  # this folder (a script's own is on sys.path)

REPO = Path(__file__).resolve().parents[1]


def run_tiny_job(run_dir: Path) -> dict:
    command = [sys.executable, "-m", "alpaca_jax.cli", "train", "configs/tiny.yaml", f"run.dir={run_dir}",
               "train.progress_bar=false"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the tiny job failed:\n{proc.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    summary = json.loads((run_dir / "summary.json").read_text())
    first, last = metrics[0]["loss"], metrics[-1]["loss"]
    return {
        "command": "alpaca-jax train configs/tiny.yaml",
        "wall_s": wall,
        "steps": summary["steps"],
        "first_loss": first,
        "last_loss": last,
        "last_over_first": last / first,
        "packing_efficiency": summary["packing_efficiency"],
        "tokenize": summary["tokenize"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "tiny_job.json"))
    args = parser.parse_args()
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_tiny_job(Path(tmp) / "tiny")
    result.update({"benchmark": "tiny_job", "machine": machine(load_before)})
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['wall_s']:.0f} s, {result['steps']} steps, loss {result['first_loss']:.4f} -> "
          f"{result['last_loss']:.4f} ({result['last_over_first']:.3f} of the first)")


if __name__ == "__main__":
    main()
