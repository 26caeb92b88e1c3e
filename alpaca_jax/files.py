"""User files at the edges of a command: text that must be UTF-8, places that must be writable.

Both checks run before any expensive work (imports of JAX, tokenizing, compiling) so that a bad
path costs a second, and both fail with one line naming the file, line or path. Nothing here
imports JAX or model code: `data_gen` uses it too.

Why a write probe and not only `os.access`: `os.access` answers from permission bits, which
root ignores, while a read-only mount, a pseudo-filesystem (/sys) or a full disk refuse the
write anyway. Creating (and removing) a file is the only answer that holds for every user.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["read_utf8", "check_writable_dir", "check_writable_file"]


def read_utf8(path: str | Path, error: type[Exception] = ValueError) -> str:
    """The file's text; bytes that are not UTF-8 raise `error` naming the file, line and column."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); "
                    f"re-encode the file as UTF-8") from None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe(directory: Path) -> str | None:
    """Why files cannot be created in `directory`, or None when they can."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return "permission denied"
    try:
        fd, probe = tempfile.mkstemp(prefix=".alpaca-jax-write-probe-", dir=directory)
    except OSError as e:
        return e.strerror or type(e).__name__
    os.close(fd)
    os.unlink(probe)
    return None


def check_writable_dir(path: str | Path, what: str, error: type[Exception] = ValueError) -> None:
    """Raise `error` unless directory `path` exists writable or can be created. Creates nothing.

    `what` names the setting or argument the path came from (e.g. 'run.dir', 'OUT_DIR').
    """
    path = Path(path).absolute()
    _check_creatable(path, path, what, error)


def check_writable_file(path: str | Path, what: str, error: type[Exception] = ValueError) -> None:
    """Raise `error` unless file `path` can be written (its folder writable, itself not a folder)."""
    path = Path(path).absolute()
    if path.is_dir():
        raise error(f"{what}: {path} is a directory, not a file")
    _check_creatable(path, path.parent, what, error)


def _check_creatable(path: Path, directory: Path, what: str, error: type[Exception]) -> None:
    existing = _nearest_existing(directory)
    if not existing.is_dir():
        raise error(f"{what}: cannot create {path}: {existing} is not a directory")
    reason = _probe(existing)
    if reason is not None:
        where = "" if existing == path else f" (in {existing})"
        raise error(f"{what}: cannot write to {path}{where}: {reason}")
