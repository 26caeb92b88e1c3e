"""lm-evaluation-harness tasks on our models: find the tasks, run `lm_eval.simple_evaluate` with
our backend (lm_eval_backend.py), and return each task's metrics with lm-eval's stderr.

Tasks run offline: the Hugging Face hub is switched off while they load and run, so a task
reads local files only (`dataset_path: json` with `dataset_kwargs: {data_files: ...}`, or a
dataset already in the local cache). Task files are checked before any model loads: a name
that no task has, or a YAML file in `--include-path` that does not parse, is a one-line
`TaskError`. Built-in tasks are indexed only when a name is not found among the included ones
(the index of lm-eval's few thousand YAML files takes seconds).

Not here: the model side of lm-eval (lm_eval_backend.py), the results table (report.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

__all__ = ["TaskError", "load_tasks", "run_tasks", "task_metrics"]

log = logging.getLogger("alpaca_jax")

BOOTSTRAP_ITERS = 1000   # resamples for the stderr of metrics without a closed form (lm-eval's CLI: 100000)


class TaskError(ValueError):
    """An lm-eval task that cannot be found or read; one line names it."""


def _check_include_path(include_path: str | Path) -> None:
    """Every YAML file under `include_path` parses (lm-eval's own loader skips one that does
    not, silently, so its task would only ever be reported as unknown)."""
    from lm_eval.tasks._yaml_loader import load_yaml
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
    from lm_eval.tasks import TaskManager
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


@contextlib.contextmanager
def _offline():
    """No hub access while tasks load and run: datasets and huggingface_hub read these flags
    when they are imported, so the module constants are switched as well as the environment."""
    import datasets.config
    import huggingface_hub.constants as hub
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved = (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_tasks(lm, tasks: list[str], *, manager=None, include_path: str | Path | None = None,
              num_fewshot: int | None = None, limit: int | None = None, apply_chat_template: bool = False,
              bootstrap_iters: int = BOOTSTRAP_ITERS) -> dict:
    """`lm_eval.simple_evaluate` of `lm` (any lm-eval LM: ours, or its `hf` backend) on `tasks`,
    offline; returns lm-eval's own results dict (per-sample logs included)."""
    import lm_eval
    manager = manager if manager is not None else load_tasks(tasks, include_path)
    with _offline():
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot,
                                       limit=limit, apply_chat_template=apply_chat_template,
                                       bootstrap_iters=bootstrap_iters, log_samples=True)


def task_metrics(results: dict) -> dict[str, dict[str, dict]]:
    """lm-eval's results -> {task: {metric: {"value", "stderr"}}}, the metric named with its
    filter unless that is lm-eval's default ("none"): acc, acc_norm, exact_match,strict-match."""
    metrics: dict[str, dict[str, dict]] = {}
    for task, values in results["results"].items():
        row = {}
        for key, value in values.items():
            if "," not in key or "_stderr," in key:
                continue
            name, filt = key.split(",", 1)
            stderr = values.get(f"{name}_stderr,{filt}")
            row[name if filt == "none" else f"{name},{filt}"] = {
                "value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None}
        metrics[task] = row
    return metrics
