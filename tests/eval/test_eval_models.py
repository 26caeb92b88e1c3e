"""`alpaca-jax eval` on a trained run: perplexity equals the training loop's held-out loss on
the same rows, generations in AlpacaEval's layout, and the run judged against itself wins 50%."""

from __future__ import annotations

import json

import pytest
from judge_fakes import always_a, write_judge_config

from alpaca_jax.eval import evaluate, load_judge_config
from alpaca_jax.eval.outputs import FIELDS
from alpaca_jax.train.loop import build_batches


def test_eval_of_a_trained_run_end_to_end(tmp_path, held_out_run, judge_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "dummy")
    cfg, trained = held_out_run
    run_dir = str(cfg.run.path)
    *_, held_out = build_batches(cfg, cfg.run.path)
    assert held_out.stats.truncated == 0  # so the model's full context scores the same tokens
    from alpaca_jax.data import load_instruction_dataset
    from alpaca_jax.data.split import held_out_split
    split = held_out_split(load_instruction_dataset(cfg.data.train_files), cfg.data.eval_fraction,
                           cfg.train.seed, load_instruction_dataset(cfg.data.eval_files))
    data = tmp_path / "held_out.json"
    data.write_text(json.dumps(split.eval.to_list()))

    server, judge = judge_server(always_a)
    judge_cfg = load_judge_config(write_judge_config(tmp_path / "judge.yaml", server.url))
    results = evaluate([run_dir, run_dir], str(data), tmp_path / "out", judge=judge_cfg, baseline=run_dir,
                       max_new_tokens=8, batch_size=8, progress=False)

    first, second = results["runs"]
    assert first["reference_loss"] == pytest.approx(trained.eval_loss, rel=1e-5)
    assert first["perplexity"] == pytest.approx(2.718281828459045 ** trained.eval_loss, rel=1e-5)
    assert first["reference_tokens"] == held_out.stats.loss_tokens
    assert 0.0 <= first["rouge_l"] <= 1.0
    outputs = json.loads((tmp_path / "out" / "model_outputs" / "run.json").read_text())
    assert len(outputs) == len(split.eval) and all(tuple(row) == FIELDS for row in outputs)
    assert {row["generator"] for row in outputs} == {"run"}
    again = json.loads((tmp_path / "out" / "model_outputs" / "run-2.json").read_text())
    assert [r["output"] for r in again] == [r["output"] for r in outputs]  # greedy is deterministic
    assert results["baseline"] == "run" and second["judge"]["win_rate"] == 0.5
    assert len(judge.shown) == 2 * len(split.eval)


def test_compare_runs_notebook_runs_on_a_real_kernel(tmp_path, held_out_run, eval_files, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from alpaca_jax.train import read_metrics
    from conftest import REPO
    cfg, _ = held_out_run
    twin = tmp_path / "twin"  # a second run directory: the same metrics under another name
    twin.symlink_to(cfg.run.path, target_is_directory=True)
    evaluate([str(eval_files["good"]), str(eval_files["plain"])], str(eval_files["data"]), tmp_path / "eval",
             progress=False)
    monkeypatch.setenv("ALPACA_RUN_DIRS", f"{cfg.run.path}:{twin}")
    monkeypatch.setenv("ALPACA_EVAL_DIR", str(tmp_path / "eval"))
    notebook = nbformat.read(REPO / "notebooks" / "compare_runs.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    last_eval = [m for m in read_metrics(cfg.run.path) if "eval_loss" in m][-1]
    for name in ("run", "twin"):
        assert f"{name}: {last_eval['tokens_seen']:,} tokens" in printed
    assert f"eval loss {last_eval['eval_loss']:.4f}" in printed
    assert "| good |" in printed and "| plain |" in printed
    assert (cfg.run.path / "compare_runs.png").stat().st_size > 1000
