"""Metric sinks: `metrics.jsonl` (one JSON object per log step, flushed at once so a crash loses
nothing already logged) and TensorBoard event files. Only process 0 writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from alpaca_jax.jsonl import read_jsonl


class MetricsWriter:
    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True, append: bool = False):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        self._file = open(run_dir / "metrics.jsonl", "a" if append else "w", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: only runs that want it
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    # eval_loss -> eval/loss beside train/loss in TensorBoard's panels
                    tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                    self._tb.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The metric records of a run, for notebooks and tests (a run killed mid-write may have left a
    torn last line: it is skipped, not repaired, since the run may still be writing)."""
    return [record for _, record in read_jsonl(Path(run_dir) / "metrics.jsonl")]
