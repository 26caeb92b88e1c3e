"""lm-evaluation-harness tasks on our models: `lm_eval.simple_evaluate` with our backend
(lm_eval_backend.py), offline, and each task's metrics with lm-eval's stderr.

Tasks run offline: the Hugging Face hub is switched off while they load and run, so a task
reads local files only (`dataset_path: json` with `dataset_kwargs: {data_files: ...}`, or a
dataset already in the local cache).

    from alpaca_jax.eval.harness import task_scores
    from alpaca_jax.eval.tasks import load_tasks
    from alpaca_jax.infer import load_model
    scores = task_scores(load_model("runs/smoke"), ["my_task"], manager=load_tasks(["my_task"], "tasks/"),
                         num_fewshot=2)   # {"my_task": {"acc": {"value": ..., "stderr": ...}, ...}}

Not here: finding and checking tasks (tasks.py), the model side (lm_eval_backend.py), the
results table (report.py).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import datasets.config
import huggingface_hub.constants
import lm_eval

from alpaca_jax.eval.lm_eval_backend import AlpacaJaxLM
from alpaca_jax.eval.tasks import load_tasks

__all__ = ["run_tasks", "task_metrics", "task_scores"]

BOOTSTRAP_ITERS = 1000   # resamples for the stderr of metrics without a closed form (lm-eval's CLI: 100000)


@contextlib.contextmanager
def _offline():
    """No hub access while tasks load and run: datasets and huggingface_hub read these flags
    when they are imported, so the module constants are switched as well as the environment."""
    hub = huggingface_hub.constants
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved = (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved
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
    manager = manager if manager is not None else load_tasks(tasks, include_path)
    with _offline():
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot,
                                       limit=limit, apply_chat_template=apply_chat_template,
                                       bootstrap_iters=bootstrap_iters, log_samples=True)


def task_scores(model, tasks: list[str], *, batch_size: int = 16, **kwargs) -> dict[str, dict[str, dict]]:
    """Our backend on a `LoadedModel` through `run_tasks` (same keywords) -> `task_metrics`."""
    return task_metrics(run_tasks(AlpacaJaxLM(model, batch_size=batch_size), tasks, **kwargs))


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
