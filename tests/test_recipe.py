"""`alpaca-jax recipe`: the tiny recipe end to end against the suite's fake teacher and fake
judge (real HTTP on 127.0.0.1), through the real CLI. One module-scoped sequence of runs:

1. the whole recipe; 2. the same again: every stage skipped, no request paid twice, nothing
retrained; 3. `dedup.threshold` changed (0.7 -> 0.71: no pair of these rows scores in between,
so dedup keeps the same rows and training sees the same data and config), killed with SIGKILL
once the new training run has a checkpoint, then rerun: generation never reruns, dedup and
every later stage do, and training resumes and ends bitwise where run 1's uninterrupted
training ended."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from helpers import make_tiny_run
from judge_fakes import ScriptedJudge, fake_openai, prefers_good

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OPENAI_API_KEY": "dummy"}
STAGES = ("generate", "dedup", "train", "eval", "export")


def _recipe_command(recipe: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "alpaca_jax.cli", "recipe", str(recipe), *args]


def _run(recipe: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_recipe_command(recipe, *args), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_second"} for line in lines if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    teacher = fake_openai.FakeOpenAI().start()
    judge = fake_openai.FakeOpenAI(reply=ScriptedJudge(prefers_good)).start()
    try:
        recipe = yaml.safe_load((REPO / "configs" / "recipes" / "tiny.yaml").read_text())
        recipe["dir"] = str(root / "r")
        recipe["generate"]["teacher"].update(base_url=teacher.url, max_retries=1, backoff_initial_s=0.01,
                                             backoff_max_s=0.02, max_connect_retries=0)
        recipe["eval"]["data"] = str(REPO / "data_gen" / "seed_tasks.jsonl")
        recipe["eval"]["judge"]["judge"].update(base_url=judge.url, max_retries=1, backoff_initial_s=0.01,
                                                backoff_max_s=0.02, max_connect_retries=0)
        path = root / "tiny.yaml"
        path.write_text(yaml.safe_dump(recipe))
        out = {"recipe": path, "dir": root / "r", "teacher": teacher, "judge": judge}

        out["first"] = _run(path)
        out["first_metrics"] = _metrics(root / "r" / "train" / "run")
        out["first_data"] = (root / "r" / "dedup" / "data.json").read_bytes()
        out["after_first"] = {"teacher": len(teacher.log), "judge": len(judge.log),
                              "train": _tree_bytes(root / "r" / "train"), "hf": _tree_bytes(root / "r" / "export" / "hf")}
        out["second"] = _run(path)
        out["after_second"] = {"teacher": len(teacher.log), "judge": len(judge.log),
                               "train": _tree_bytes(root / "r" / "train"), "hf": _tree_bytes(root / "r" / "export" / "hf")}

        # 3: a changed dedup key, killed once the new training run has committed a checkpoint.
        old_train = json.loads((root / "r" / "train" / "manifest.json").read_text())["fingerprint"]
        killed = subprocess.Popen(_recipe_command(path, "dedup.threshold=0.71"), env=ENV,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        checkpoints = root / "r" / "train" / "run" / "checkpoints"
        deadline = time.monotonic() + 300
        while True:
            assert killed.poll() is None, killed.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint of the new training run within 300 s"
            manifest = root / "r" / "train" / "manifest.json"
            try:
                fresh = json.loads(manifest.read_text())["fingerprint"] != old_train
            except (FileNotFoundError, json.JSONDecodeError):
                fresh = False
            if fresh and checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
                break
            time.sleep(0.005)
        killed.send_signal(signal.SIGKILL)
        _, out["killed_log"] = killed.communicate(timeout=60)
        out["killed_manifest"] = json.loads((root / "r" / "train" / "manifest.json").read_text())
        out["resumed"] = _run(path, "dedup.threshold=0.71")
        out["status"] = _run(path, "dedup.threshold=0.71", "--status").stdout
        out["after_third"] = {"teacher": len(teacher.log)}

        yield out
    finally:
        teacher.stop()
        judge.stop()


def _lines(log: str, prefix: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith(prefix)]


def test_tiny_recipe_runs_end_to_end(runs):
    recipe_dir = runs["dir"]
    for stage in STAGES:
        manifest = json.loads((recipe_dir / stage / "manifest.json").read_text())
        assert manifest["status"] == "done" and manifest["outputs"], stage
    generated = json.loads((recipe_dir / "generate" / "data.json").read_text())
    deduped = json.loads((recipe_dir / "dedup" / "data.json").read_text())
    assert len(generated) >= 24 and 0 < len(deduped) <= len(generated)
    assert runs["after_first"]["teacher"] > 0 and runs["after_first"]["judge"] > 0
    # The export opens with the safetensors library; the report holds funnel, curve and table.
    from safetensors import safe_open
    with safe_open(recipe_dir / "export" / "hf" / "model.safetensors", "numpy") as f:
        assert "model.embed_tokens.weight" in f.keys()
    assert json.loads((recipe_dir / "export" / "hf" / "config.json").read_text())["hidden_size"] == 64
    report = (recipe_dir / "report.md").read_text()
    assert f"| kept by dedup | {len(deduped)} |" in report
    assert "![training loss](loss_train.png)" in report and (recipe_dir / "loss_train.png").read_bytes()[:4] == b"\x89PNG"
    assert "win rate" in report.lower() or "perplexity" in report.lower()


def test_rerun_skips_every_stage_and_pays_nothing(runs):
    log = runs["second"].stderr
    for stage in STAGES:
        assert _lines(log, f"{stage}: skipped (done"), (stage, log[-2000:])
    assert runs["after_second"]["teacher"] == runs["after_first"]["teacher"]
    assert runs["after_second"]["judge"] == runs["after_first"]["judge"]
    assert runs["after_second"]["train"] == runs["after_first"]["train"]  # not a byte retrained
    assert runs["after_second"]["hf"] == runs["after_first"]["hf"]


def test_changed_dedup_key_reruns_dedup_and_later_not_generation(runs):
    killed, resumed = runs["killed_log"], runs["resumed"].stderr
    assert _lines(killed, "generate: skipped (done")
    assert _lines(killed, "dedup: running (stale: config changed: dedup.threshold)")
    assert _lines(killed, "train: running (stale")
    assert _lines(resumed, "generate: skipped (done") and _lines(resumed, "dedup: skipped (done")
    for stage in ("eval", "export"):
        assert _lines(resumed, f"{stage}: running (stale"), (stage, resumed[-2000:])
    assert runs["after_third"]["teacher"] == runs["after_first"]["teacher"]  # generation never re-paid
    assert json.loads((runs["dir"] / "dedup" / "manifest.json").read_text())["config"]["threshold"] == 0.71
    assert all(line.split()[1] == "done" for line in runs["status"].splitlines()), runs["status"]


def test_sigkill_in_training_resumes_bitwise(runs):
    assert runs["killed_manifest"]["status"] == "running"  # killed inside training, not after
    resumed = runs["resumed"].stderr
    assert _lines(resumed, "train: running (pending: interrupted")
    assert "resumed from checkpoint" in resumed
    # The same rows and config as run 1, whose training was never interrupted.
    assert (runs["dir"] / "dedup" / "data.json").read_bytes() == runs["first_data"]
    resumed_metrics = _metrics(runs["dir"] / "train" / "run")
    assert resumed_metrics == runs["first_metrics"]  # floats compared exactly
    assert len(resumed_metrics) > 2


def test_closed_loop_serves_the_teacher_and_stops_it(tmp_path):
    """`teacher_from`: the recipe serves an earlier model with `alpaca-jax serve` on 127.0.0.1,
    the generator's requests reach it, and the server is stopped afterwards, also when the
    stage fails (a random tiny model's context is too short for the Alpaca prompt: a 400)."""
    model = make_tiny_run(tmp_path / "teacher")
    recipe = {"dir": str(tmp_path / "r"), "teacher_from": str(model), "stages": ["generate"],
              "generate": {"teacher": {"max_retries": 0, "max_connect_retries": 0, "max_concurrency": 1},
                           "pipeline": {"num_instructions": 2, "requests_per_round": 1, "max_idle_rounds": 1},
                           "output": {"progress": False}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    done = subprocess.run(_recipe_command(tmp_path / "r.yaml"), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: stage 'generate' stopped")
    log = (tmp_path / "r" / "generate" / "teacher_serve.log").read_text()
    assert "as 'recipe-teacher' on http://127.0.0.1:" in log
    assert '"POST /v1/completions HTTP/1.1" 400' in log       # the generator asked the served model
    assert log.rstrip().endswith("Finished server process [" + log.split("Started server process [")[1].split("]")[0] + "]")
