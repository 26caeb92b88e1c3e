"""Loading instruction records from local JSON / JSONL files, with errors that name the line.

Accepted layouts, per file:
- Alpaca: one JSON array of `{instruction, input, output}` objects (the released
  `alpaca_data.json` layout), or the same objects one per line (JSONL). `input` may be absent.
- Self-Instruct seed tasks: `{instruction, instances: [{input, output}, ...], ...}` per line;
  each instance becomes one Alpaca row.

Rows are validated here, with their file and line, before `datasets` loads them, because a
malformed row deep in a 52K-row file must be reported precisely rather than as an Arrow error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import datasets

from alpaca_jax.errors import UserError
from alpaca_jax.files import read_utf8

BUILTIN_PREFIX = "builtin:"


class DataError(UserError, ValueError):
    """Bad training data; the message is one line naming the file (and line)."""


def resolve_data_path(name: str) -> Path:
    """A path, or `builtin:seed_tasks` for the seed pool shipped inside `data_gen`."""
    if name.startswith(BUILTIN_PREFIX):
        builtin = name[len(BUILTIN_PREFIX):]
        # The pool ships inside the data_gen package, installed beside alpaca_jax (editable or
        # not). Located by path rather than import so a `tests/data_gen` folder cannot shadow it.
        path = Path(__file__).resolve().parents[2] / "data_gen" / f"{builtin}.jsonl"
    else:
        path = Path(name).expanduser()
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return path


def json_rows(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, value) of each top-level row of a JSON array or JSONL file, unvalidated
    (each reader checks its own row layout); malformed JSON or non-UTF-8 bytes name file:line."""
    path = Path(path)
    text = read_utf8(path, DataError)
    stripped = text.lstrip()
    decoder = json.JSONDecoder()
    if stripped.startswith("["):
        # Walk the array element by element so each row keeps its line number.
        pos = text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: unterminated JSON array")
            if text[pos] == "]":
                return
            line = text.count("\n", 0, pos) + 1
            try:
                value, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
            yield line, value
    else:
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: malformed JSON: {e.msg}") from None


def _require_str(row: dict, key: str, where: str, optional: bool = False) -> str:
    value = row.get(key, "" if optional else None)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        got = "missing" if key not in row else f"a {type(value).__name__}"
        raise DataError(f"{where}: field '{key}' must be a string, got {got}")
    return value


def alpaca_rows(where: str, row: object, fmt: str, require_output: bool = True) -> list[dict[str, str]]:
    """One Alpaca or seed-task row -> Alpaca rows; `where` ("file:line") names it in errors.
    `require_output=False` accepts rows without an output (prompts to answer); theirs is ""."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: each row must be a JSON object, got {type(row).__name__}")
    is_seed = "instances" in row if fmt == "auto" else fmt == "seed_tasks"
    instruction = _require_str(row, "instruction", where)
    if not is_seed:
        return [{"instruction": instruction, "input": _require_str(row, "input", where, optional=True),
                 "output": _require_str(row, "output", where, optional=not require_output)}]
    instances = row.get("instances")
    if not isinstance(instances, list) or not instances:
        raise DataError(f"{where}: field 'instances' must be a non-empty list")
    return [{"instruction": instruction,
             "input": _require_str(inst, "input", where, optional=True) if isinstance(inst, dict) else _bad(where),
             "output": _require_str(inst, "output", where, optional=not require_output)}
            for inst in instances]


def _bad(where: str):
    raise DataError(f"{where}: each instance must be a JSON object")


def read_records(path: str | Path, fmt: str = "auto", require_output: bool = True) -> list[dict[str, str]]:
    """All Alpaca rows of one file, validated; raises DataError naming file:line.
    `require_output=False` accepts rows without an output (prompts to answer); theirs is ""."""
    path = Path(path)
    rows: list[dict[str, str]] = []
    for line, value in json_rows(path):
        rows.extend(alpaca_rows(f"{path}:{line}", value, fmt, require_output))
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def load_instruction_dataset(files: tuple[str, ...] | list[str], fmt: str = "auto") -> datasets.Dataset:
    """A `datasets.Dataset` with columns instruction, input, output, from all files in order."""
    rows: list[dict[str, str]] = []
    for name in files:
        rows.extend(read_records(resolve_data_path(name), fmt))
    return datasets.Dataset.from_list(rows)
