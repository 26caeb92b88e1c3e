"""Loading a seed task pool (Self-Instruct's JSONL format) into `SeedTask`s, and the stage 3
demonstrations into `DemoTask`s.

Each line: {"id", "name", "instruction", "instances": [{"input", "output"}, ...],
"is_classification"}; the original 175-task file from Self-Instruct / Alpaca is accepted as is.
Only the first instance of a seed task is used as a demonstration, as both papers do; a stage 3
demonstration file uses the same format and shows every instance.
"""

from __future__ import annotations

import json
from pathlib import Path

from alpaca_jax.configlib import ConfigError
from data_gen.prompts import DemoTask, SeedTask

__all__ = ["load_seed_tasks", "load_instance_demos"]


def _records(path: Path, key: str):
    """(line number, record) for each non-empty line; a missing file is a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"file not found: {path} ({key})")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{path}:{number}: not JSON ({e}) ({key})") from None


def load_seed_tasks(path: str | Path) -> list[SeedTask]:
    path = Path(path)
    tasks = []
    for number, record in _records(path, "pipeline.seed_tasks"):
        try:
            instance = record["instances"][0]
            tasks.append(SeedTask(instruction=record["instruction"].strip(),
                                  input=instance.get("input", "").strip(),
                                  output=instance["output"].strip(),
                                  is_classification=bool(record.get("is_classification", False))))
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path}:{number}: not a seed task ({type(e).__name__}: {e})") from None
    if not tasks:
        raise ConfigError(f"seed task file is empty: {path}")
    return tasks


def load_instance_demos(path: str | Path) -> list[DemoTask]:
    """Stage 3 demonstrations; both kinds must be present (each stage 3 prompt shows one kind)."""
    path = Path(path)
    demos = []
    for number, record in _records(path, "pipeline.instance_demos"):
        try:
            instances = tuple((i.get("input", "").strip(), i["output"].strip()) for i in record["instances"])
            if not instances:
                raise IndexError("no instances")
            demos.append(DemoTask(record["instruction"].strip(), instances,
                                  bool(record.get("is_classification", False))))
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path}:{number}: not a demonstration task ({type(e).__name__}: {e})") from None
    if len({d.is_classification for d in demos}) < 2:
        raise ConfigError(f"{path}: needs classification and non-classification demonstrations "
                          "(pipeline.instance_demos)")
    return demos
