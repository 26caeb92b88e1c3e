"""AlpacaEval's model-outputs files: what each run answered, readable by the `alpaca_eval` tool.

A JSON array of `{"instruction", "output", "generator", "dataset"}` objects, exactly those four
fields, one per instruction in the eval file's order (AlpacaEval matches outputs to its
annotations by `instruction`). `alpaca-jax eval` writes one per run, and also *reads* such
files in place of a run directory, so answers from any other system can be judged against
ours.

Not here: producing the answers (alpaca_jax.infer), judging them (judge.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from alpaca_jax.data.records import DataError, json_rows
from alpaca_jax.eval.dataset import EvalItem

__all__ = ["FIELDS", "write_model_outputs", "read_model_outputs"]

FIELDS = ("instruction", "output", "generator", "dataset")


def write_model_outputs(path: str | Path, items: list[EvalItem], outputs: list[str], generator: str) -> Path:
    rows = [{"instruction": item.question, "output": output, "generator": generator, "dataset": item.dataset}
            for item, output in zip(items, outputs, strict=True)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a killed run never leaves half a file that a rerun would trust
    return path


def read_model_outputs(path: str | Path, items: list[EvalItem]) -> tuple[str, list[str]]:
    """(generator name, one output per item), matched by instruction; names the first
    instruction of the eval file the outputs file does not answer."""
    path = Path(path)
    by_instruction: dict[str, str] = {}
    generator = None
    for line, row in json_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) \
                or not isinstance(row.get("output"), str):
            raise DataError(f"{path}:{line}: a model output needs string fields 'instruction' and 'output'")
        by_instruction[row["instruction"]] = row["output"]
        generator = generator or row.get("generator")
    missing = [item.question for item in items if item.question not in by_instruction]
    if missing:
        raise DataError(f"{path}: no output for {len(missing)} instruction(s) of the eval file, "
                        f"e.g. {missing[0][:80]!r}")
    return str(generator or path.stem), [by_instruction[item.question] for item in items]
