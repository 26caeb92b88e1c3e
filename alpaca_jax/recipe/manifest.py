"""A stage's manifest: what it ran with, what it read, what it wrote, and whether it finished.

`RECIPE_DIR/<stage>/manifest.json` holds the stage's resolved config, a hash of each input,
the stage's fingerprint (config and inputs together), the hash of each output, and its status
(`running` from the moment it starts, `done` once every output is written). A later stage's
input hash is the producing stage's fingerprint plus its outputs' hash, so changing one key
makes that stage and every stage after it stale, and nothing before it.

Not here: the stages (stages.py) and the decision to run them (runner.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["hash_path", "fingerprint", "read_manifest", "write_manifest", "MANIFEST"]

MANIFEST = "manifest.json"
_CHUNK = 1 << 20
# Files above this are hashed by size and modification time, not bytes: a 7B run's checkpoints
# are tens of GB, and every rerun checks every stage's outputs. A replaced or rewritten file
# changes its mtime; only an edit that restores the mtime by hand would go unseen.
CONTENT_HASH_LIMIT = 256 << 20


def _hash_file(path: Path, digest) -> None:
    stat = path.stat()
    if stat.st_size > CONTENT_HASH_LIMIT:
        digest.update(f"size={stat.st_size} mtime_ns={stat.st_mtime_ns}".encode())
        return
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)


def hash_path(path: str | Path) -> str | None:
    """sha256 of a file's bytes, or of a folder's files (relative paths and bytes, sorted);
    files over CONTENT_HASH_LIMIT count by size and mtime. None when the path is absent."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file(path, digest)
    elif path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path)).encode() + b"\0")
            _hash_file(file, digest)
    else:
        return None
    return digest.hexdigest()


def fingerprint(config: Any, inputs: dict[str, str | None]) -> str:
    """One hash of a stage's resolved config and its inputs' hashes."""
    text = json.dumps({"config": config, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_manifest(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # absent, or torn by a kill during the (atomic) write: the stage reruns


def write_manifest(stage_dir: Path, manifest: dict) -> None:
    """Atomic: written to a temporary file, fsync'ed, renamed."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / (MANIFEST + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(stage_dir / MANIFEST)
