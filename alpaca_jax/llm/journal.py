"""Crash-safe, append-only journal of completed teacher requests.

Every response the teacher returns is appended as one JSON line and fsync'ed before anyone
uses it. The generator is a deterministic function of (config, seed pool, journal): on
restart it replays the same rounds, finds each finished request here by its id and never sends
it again, so after `kill -9` at any moment nothing is lost, duplicated or paid for twice.
A kill in the middle of a write leaves at most one partial last line; `open` cuts it off
(alpaca_jax/jsonl.py: a bad line anywhere else is an error naming file:line).

Not here: what a request is or how responses are parsed (client.py, data_gen/prompts.py).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from alpaca_jax.jsonl import read_jsonl

__all__ = ["Journal"]


class Journal:
    """id -> record, loaded from and appended to a JSONL file (thread-safe appends)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._load()
        self._file = open(self.path, "ab")
        _fsync_dir(self.path.parent)

    def _load(self) -> None:
        # A torn last line (a kill mid-write: that request was not completed for us) is cut
        # off; a bad line before it is an error naming file:line, never a silent truncation
        # that would drop every later, paid-for record.
        for _, record in read_jsonl(self.path, repair=True):
            self._records[record["id"]] = record

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._records.values())

    def get(self, request_id: str) -> dict[str, Any] | None:
        return self._records.get(request_id)

    def append(self, record: dict[str, Any]) -> None:
        """Durably record a completed request; returns only once it is on disk."""
        line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._records[record["id"]] = record

    def extend(self, records: list[dict[str, Any]]) -> None:
        """Durably record many completed requests with one fsync (a Batch API output file).
        A kill mid-write loses a tail the caller can rebuild (the batch output is re-downloaded)."""
        if not records:
            return
        blob = b"".join((json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
                        for r in records)
        with self._lock:
            self._file.write(blob)
            self._file.flush()
            os.fsync(self._file.fileno())
            for record in records:
                self._records[record["id"]] = record

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _fsync_dir(path: Path) -> None:
    # A new file's directory entry is durable only once the directory itself is synced.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
