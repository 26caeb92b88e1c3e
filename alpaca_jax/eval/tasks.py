"""Finding lm-evaluation-harness tasks, checked before any model loads (no JAX here).

A task is named as lm-eval names it: a task, group or tag from `--include-path` (a directory of
task YAML files) or lm-eval's built-in ones. A name that no task has, or a YAML file in the
include path that does not parse, is a one-line `TaskError`. Built-in tasks are indexed only
when a name is not found among the included ones (indexing lm-eval's thousands of YAML files
takes seconds).

Not here: running the tasks (harness.py).
"""

from __future__ import annotations

from pathlib import Path

from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from alpaca_jax.errors import UserError

__all__ = ["TaskError", "load_tasks"]


class TaskError(UserError, ValueError):
    """An lm-eval task that cannot be found or read; one line names it."""


def _check_include_path(include_path: str | Path) -> None:
    """Every YAML file under `include_path` parses (lm-eval's own loader skips one that does
    not, silently, so its task would only ever be reported as unknown)."""
    root = Path(include_path)
    if not root.is_dir():
        raise TaskError(f"--include-path {root}: directory not found")
    for path in sorted(root.glob("**/*.yaml")):
        try:
            load_yaml(path, resolve_func=False, recursive=True)
        except Exception as e:  # yaml errors, include cycles, a non-mapping document
            first = " ".join(str(e).split())  # one line
            raise TaskError(f"task file {path} does not parse: {first}") from None


def load_tasks(tasks: list[str], include_path: str | Path | None = None):
    """A `TaskManager` that knows every name in `tasks` (the included tasks first, lm-eval's
    built-in ones only when needed); an unknown name is a TaskError."""
    if not tasks:
        raise TaskError("--tasks: no task names given")
    if include_path is not None:
        _check_include_path(include_path)
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if not _unknown(manager, tasks):
            return manager
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = _unknown(manager, tasks)
    if unknown:
        where = f" in {include_path} or" if include_path is not None else ""
        raise TaskError(f"unknown task(s) {', '.join(unknown)}: not found{where} among lm-eval's built-in tasks")
    return manager


def _unknown(manager, tasks: list[str]) -> list[str]:
    return [t for t in tasks if not manager.match_tasks([t]) and not Path(t).is_file()]
