"""Evaluation files: instructions, optional reference answers, optional categories.

Accepted row layouts (JSON array or JSONL, detected per row):
- Alpaca: `{instruction, input?, output?}`; `output` is the reference answer.
- Self-Instruct user-oriented (`user_oriented_instructions.jsonl`, the 252 instructions Alpaca
  was judged on): `{instruction, instances: [{input, output}, ...], motivation_app}`; each
  instance is one item, `motivation_app` its category.
- AlpacaEval: `{instruction, output?, dataset?, generator?}`.
A `category` field, where present, is a category too. Rows without `output` have no reference:
perplexity and ROUGE-L are then skipped (with the reason in the results), judging against the
references too.

Not here: the training-data loader (alpaca_jax/data/records.py: it requires outputs).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from alpaca_jax.data.prompt import alpaca_messages
from alpaca_jax.data.records import DataError, json_rows

__all__ = ["EvalItem", "load_eval_file"]


@dataclasses.dataclass(frozen=True)
class EvalItem:
    instruction: str
    input: str
    reference: str | None          # the file's answer; None when the row has none
    category: str | None           # motivation_app / category; None when absent
    dataset: str                   # AlpacaEval's `dataset` field: the row's, else the file's stem

    @property
    def messages(self) -> list[dict[str, str]]:
        """What the model is asked: one user turn, rendered by the run's own chat template
        through the prompt owner (data/prompt.py), as training rendered such a row."""
        return alpaca_messages(self.instruction, self.input)

    @property
    def question(self) -> str:
        """The instruction as AlpacaEval and the judge show it: the input appended."""
        return f"{self.instruction}\n\n{self.input}" if self.input.strip() else self.instruction


def _text(row: dict, key: str, where: str, required: bool = False) -> str | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got "
                        f"{'missing' if key not in row else type(value).__name__}")
    return value


def load_eval_file(path: str | Path) -> list[EvalItem]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"eval data file not found: {path}")
    items = []
    for line, row in json_rows(path):
        where = f"{path}:{line}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: each row must be a JSON object, got {type(row).__name__}")
        instruction = _text(row, "instruction", where, required=True)
        category = _text(row, "motivation_app", where) or _text(row, "category", where)
        dataset = _text(row, "dataset", where) or path.stem
        instances = row.get("instances", [row])
        if not isinstance(instances, list) or not instances:
            raise DataError(f"{where}: field 'instances' must be a non-empty list")
        for instance in instances:
            if not isinstance(instance, dict):
                raise DataError(f"{where}: each instance must be a JSON object")
            items.append(EvalItem(instruction, _text(instance, "input", where) or "",
                                  _text(instance, "output", where), category, dataset))
    if not items:
        raise DataError(f"{path}: no rows")
    return items
