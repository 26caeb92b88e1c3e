"""Reading an append-only JSONL file that a killed writer may have left with a torn last line.

One policy for every such file (the LLM journal, `respond`'s answers, a run's metrics.jsonl):

- the LAST line, when it lacks its newline or is not JSON, is what a kill in the middle of a
  write leaves: it is dropped, logged as a warning, and (with `repair=True`) cut off the file so
  the next append starts on a clean line;
- a bad line ANYWHERE ELSE cannot come from a kill: the file was edited or damaged. It is an
  error naming `file:line`, never a silent truncation (which would drop every later record,
  e.g. paid-for teacher replies).

JAX-free (the LLM client and data_gen use it). Blank lines are skipped.

Not here: what the records mean (each reader checks its own fields).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from alpaca_jax.errors import UserError

__all__ = ["JsonlError", "read_jsonl"]

log = logging.getLogger("alpaca_jax")


class JsonlError(UserError, ValueError):
    """A line before the last one of an append-only JSONL file is not JSON."""


def read_jsonl(path: str | Path, *, repair: bool = False,
               error: type[Exception] = JsonlError) -> list[tuple[int, Any]]:
    """(1-based line number, record) of every complete line of `path` ([] when it is absent).

    A torn last line is dropped (and with `repair`, truncated off the file); any other line
    that is not JSON raises `error` with the message `path:line: ...`."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    records: list[tuple[int, Any]] = []
    good = 0  # bytes of the file that hold whole, parsed lines
    for line_no, line in enumerate(lines, start=1):
        last = line_no == len(lines)
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no newline")
            text = line.decode("utf-8")
            record = json.loads(text) if text.strip() else None
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if not last:
                raise error(f"{path}:{line_no}: not a JSON line ({_reason(e)}); only the last line "
                            f"of this append-only file may be torn: fix or remove line {line_no}") from None
            log.warning("%s:%d: dropped a torn last line (%d bytes; a write cut short by a kill)",
                        path, line_no, len(line))
            if repair:
                _truncate(path, good)
            break
        good += len(line)
        if record is not None:
            records.append((line_no, record))
    return records


def _reason(error: ValueError) -> str:
    return " ".join(str(error).split())[:120]


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())
