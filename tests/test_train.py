"""End to end: the tiny main job through the CLI, run-directory contents, the loss-curve
notebook on a real Jupyter kernel, NaN handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

from alpaca_jax.config import load_config
from alpaca_jax.train import TrainingError, read_metrics, train
from conftest import REPO

METRIC_KEYS = {"step", "loss", "learning_rate", "grad_norm", "tokens_seen", "tokens_per_second"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The README's main job (configs/tiny.yaml) with fewer steps, through the real CLI."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    result = subprocess.run(
        [sys.executable, "-m", "alpaca_jax.cli", "train", str(REPO / "configs" / "tiny.yaml"),
         f"run.dir={run_dir}", "train.max_steps=30", "train.log_every=10"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_tiny_main_job_end_to_end(tiny_run):
    run_dir, result = tiny_run
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 10, 20, 30]
    assert all(METRIC_KEYS <= set(m) for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert metrics[-1]["tokens_seen"] > metrics[0]["tokens_seen"] > 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 30 and saved["run"]["dir"] == str(run_dir)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["tokenize"]["kept"] > 175
    assert "train" in result.stderr and "packing efficiency" in result.stderr
    assert "loss: plain loss (auto: fp32 logits of" in result.stderr  # tiny logits: no chunking


def test_loss_curve_notebook_runs_on_a_real_kernel(tiny_run):
    run_dir, _ = tiny_run
    notebook = nbformat.read(REPO / "notebooks" / "loss_curves.ipynb", as_version=4)
    # Relative to the repository root, and the kernel started in the notebook's own folder, as
    # Jupyter and `jupyter nbconvert --execute` start it.
    os.environ["ALPACA_RUN_DIR"] = os.path.relpath(run_dir, REPO)
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    finally:
        del os.environ["ALPACA_RUN_DIR"]
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    last = read_metrics(run_dir)[-1]
    assert f"steps {last['step']}" in printed and f"{last['loss']:.4f}" in printed
    assert (run_dir / "loss_curve.png").stat().st_size > 1000


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "train.max_steps=6", "train.log_every=1",
                             "optimizer.learning_rate=1e30", "optimizer.warmup_steps=0",
                             "optimizer.max_grad_norm=null", "train.progress_bar=false",
                             "run.tensorboard=false"])
    with pytest.raises(TrainingError, match=r"loss is nan at step \d"):
        train(cfg)
    logged = read_metrics(tmp_path)  # everything up to the failure is on disk
    assert logged and logged[-1]["loss"] != logged[-1]["loss"]
