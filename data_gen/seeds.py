"""Loading a seed task pool (Self-Instruct's JSONL format) into `SeedTask`s.

Each line: {"id", "name", "instruction", "instances": [{"input", "output"}, ...],
"is_classification"}; the original 175-task file from Self-Instruct / Alpaca is accepted as is.
Only the first instance of a task is used as a demonstration, as both papers do.
"""

from __future__ import annotations

import json
from pathlib import Path

from alpaca_jax.configlib import ConfigError
from alpaca_jax.files import read_utf8
from data_gen.prompts import SeedTask

__all__ = ["load_seed_tasks"]


def load_seed_tasks(path: str | Path) -> list[SeedTask]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"seed task file not found: {path} (pipeline.seed_tasks)")
    tasks = []
    for number, line in enumerate(read_utf8(path, ConfigError).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            instance = record["instances"][0]
            tasks.append(SeedTask(instruction=record["instruction"].strip(),
                                  input=instance.get("input", "").strip(),
                                  output=instance["output"].strip(),
                                  is_classification=bool(record.get("is_classification", False))))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path}:{number}: not a seed task ({type(e).__name__}: {e})") from None
    if not tasks:
        raise ConfigError(f"seed task file is empty: {path}")
    return tasks
