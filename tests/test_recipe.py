"""`alpaca-jax recipe`: the tiny recipe end to end against the suite's fake teacher and fake
judge (real HTTP on 127.0.0.1; the judge both rates rows for curation and compares answers for
eval), through the real CLI. One module-scoped sequence of runs:

1. the whole recipe; 2. the same again: every stage skipped, no request paid twice, nothing
retrained; 3. `dedup.threshold` changed (0.7 -> 0.71: no pair of these rows scores in between,
so dedup keeps the same rows and training sees the same data and config), killed with SIGKILL
once the new training run has a checkpoint, then rerun: generation never reruns, dedup and
every later stage do, and training resumes and ends bitwise where run 1's uninterrupted
training ended; 4. `curate.min_score` changed: --status names curate and every later stage
stale, generate and dedup done; `--until curate` reruns curation from its rating journal
(no rating paid again) and keeps the rows the judge's rule says; min_score back: curation
reruns (free), and training is done again.

The preference (DPO) stage has its own test, run last in that recipe folder: only DPO trains."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from helpers import make_tiny_run
from judge_fakes import ScriptedJudge, fake_openai, prefers_good

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OPENAI_API_KEY": "dummy"}
STAGES = ("generate", "dedup", "curate", "train", "eval", "export")
_RATED = re.compile(r"### Instruction\n(.*)\n\n### Input\n(.*)\n\n### Response\n(.*)\n\nGive a short", re.DOTALL)


def rating(instruction: str) -> int:
    """The fake judge's rule for curation: a quarter of the rows (by a digest) score 2, the rest 5."""
    return 2 if hashlib.sha256(instruction.encode()).digest()[0] % 4 == 0 else 5


class Judge:
    """One fake judge for both uses: rates a row (curation's prompt) by `rating`, compares two
    answers (eval's pairwise prompt) with prefers_good; counts the ratings asked."""

    def __init__(self):
        self.pairwise = ScriptedJudge(prefers_good)
        self.ratings = 0
        self._lock = threading.Lock()

    def __call__(self, prompt: str) -> tuple[str, str]:
        shown = _RATED.search(prompt)
        if shown is None:
            return self.pairwise(prompt)
        with self._lock:
            self.ratings += 1
        return f"Accurate and helpful.\nScore: {rating(shown.group(1))}", "stop"


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
    rater = Judge()
    judge = fake_openai.FakeOpenAI(reply=rater).start()
    try:
        recipe = yaml.safe_load((REPO / "configs" / "recipes" / "tiny.yaml").read_text())
        recipe["dir"] = str(root / "r")
        recipe["generate"]["teacher"].update(base_url=teacher.url, max_retries=1, backoff_initial_s=0.01,
                                             backoff_max_s=0.02, max_connect_retries=0)
        recipe["curate"]["judge"].update(base_url=judge.url, max_retries=1, backoff_initial_s=0.01,
                                         backoff_max_s=0.02, max_connect_retries=0)
        recipe["eval"]["data"] = str(REPO / "data_gen" / "seed_tasks.jsonl")
        recipe["eval"]["judge"]["judge"].update(base_url=judge.url, max_retries=1, backoff_initial_s=0.01,
                                                backoff_max_s=0.02, max_connect_retries=0)
        path = root / "tiny.yaml"
        path.write_text(yaml.safe_dump(recipe))
        out = {"recipe": path, "dir": root / "r", "teacher": teacher, "judge": judge, "rater": rater,
               "recipe_data": recipe}

        out["first"] = _run(path)
        out["first_metrics"] = _metrics(root / "r" / "train" / "run")
        out["first_data"] = (root / "r" / "dedup" / "data.json").read_bytes()
        out["after_first"] = {"teacher": len(teacher.log), "judge": len(judge.log), "ratings": rater.ratings,
                              "train": _tree_bytes(root / "r" / "train"), "hf": _tree_bytes(root / "r" / "export" / "hf")}
        out["second"] = _run(path)
        out["after_second"] = {"teacher": len(teacher.log), "judge": len(judge.log), "ratings": rater.ratings,
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
        out["after_third"] = {"teacher": len(teacher.log), "ratings": rater.ratings}

        # 4: a changed curation threshold (2 keeps every row the rule scores 2 or 5).
        changed = ("dedup.threshold=0.71", "curate.min_score=2")
        out["min_score_status"] = _run(path, *changed, "--status").stdout
        out["min_score_run"] = _run(path, *changed, "--until", "curate")
        out["after_fourth"] = {"teacher": len(teacher.log), "ratings": rater.ratings}
        out["min_score_curated"] = json.loads((root / "r" / "curate" / "data.json").read_text())
        # Back to 4.0: curation's fingerprint and output are run 3's again, so training is done again.
        out["min_score_back"] = _run(path, "dedup.threshold=0.71", "--until", "curate")
        out["status_back"] = _run(path, "dedup.threshold=0.71", "--status").stdout

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
    # Curation kept exactly the deduped rows the judge's rule scores >= 4, in order; training read them.
    curated = json.loads((recipe_dir / "curate" / "data.json").read_text())
    assert curated == [row for row in deduped if rating(row["instruction"]) >= 4] and 0 < len(curated) < len(deduped)
    assert runs["after_first"]["ratings"] == len(deduped)
    train_config = yaml.safe_load((recipe_dir / "train" / "run" / "config.yaml").read_text())
    assert train_config["data"]["train_files"] == [str(recipe_dir / "curate" / "data.json")]
    # The export opens with the safetensors library; the report holds funnel, curve and table.
    from safetensors import safe_open
    with safe_open(recipe_dir / "export" / "hf" / "model.safetensors", "numpy") as f:
        assert "model.embed_tokens.weight" in f.keys()
    assert json.loads((recipe_dir / "export" / "hf" / "config.json").read_text())["hidden_size"] == 64
    # export.gguf: llama.cpp's own reader (the gguf package) opens the file as a 64-wide LLaMA.
    from gguf import GGUFReader
    fields = GGUFReader(recipe_dir / "export" / "gguf" / "model-f32.gguf").fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.embedding_length"].parts[-1][0]) == 64
    report = (recipe_dir / "report.md").read_text()
    assert f"| kept by dedup | {len(deduped)} |" in report and f"| kept by curation | {len(curated)} |" in report
    assert "![training loss](loss_train.png)" in report and (recipe_dir / "loss_train.png").read_bytes()[:4] == b"\x89PNG"
    assert "win rate" in report.lower() or "perplexity" in report.lower()


def test_rerun_skips_every_stage_and_pays_nothing(runs):
    log = runs["second"].stderr
    for stage in STAGES:
        assert _lines(log, f"{stage}: skipped (done"), (stage, log[-2000:])
    assert runs["after_second"]["teacher"] == runs["after_first"]["teacher"]
    assert runs["after_second"]["judge"] == runs["after_first"]["judge"]
    assert runs["after_second"]["ratings"] == runs["after_first"]["ratings"]
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
    assert _lines(killed, "curate: running (stale")
    assert runs["after_third"]["ratings"] == runs["after_first"]["ratings"]  # same rows: ratings replayed
    assert json.loads((runs["dir"] / "dedup" / "manifest.json").read_text())["config"]["threshold"] == 0.71
    assert all(line.split()[1] == "done" for line in runs["status"].splitlines()), runs["status"]


def test_changed_min_score_reruns_curate_and_later_not_generate_or_dedup(runs):
    status = {line.split()[0]: line for line in runs["min_score_status"].splitlines()}
    assert status["generate"].split()[1] == "done" and status["dedup"].split()[1] == "done"
    assert "stale    config changed: curate.min_score" in status["curate"], status["curate"]
    for stage in ("train", "eval", "export"):
        assert status[stage].split()[1] == "stale", status[stage]
    log = runs["min_score_run"].stderr
    assert _lines(log, "generate: skipped (done") and _lines(log, "dedup: skipped (done")
    assert _lines(log, "curate: running (stale: config changed: curate.min_score)")
    assert not _lines(log, "train:")  # --until curate
    assert runs["after_fourth"] == runs["after_third"]  # nothing paid: not the teacher, no rating
    deduped = json.loads((runs["dir"] / "dedup" / "data.json").read_text())
    assert runs["min_score_curated"] == deduped  # every row scores >= 2


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


def test_preference_stage_trains_dpo_from_the_sft_run(runs, tmp_path):
    """Runs last, in the module's recipe folder: `preference` added after `train`, a few DPO steps
    on pairs named in the recipe. Every earlier stage is skipped; DPO starts from (and is
    referenced to) the train stage's run, so its first loss is -log sigmoid(0) = ln 2 exactly;
    a rerun skips it too."""
    back = runs["min_score_back"].stderr
    assert _lines(back, "curate: running (stale: config changed: curate.min_score)")
    assert runs["status_back"].split("\n")[3].split()[:2] == ["train", "done"], runs["status_back"]
    words = ["red", "blue", "green", "apple", "river", "stone", "cloud", "music"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"List {a} and {b}.", "chosen": f"{a}, {b}.",
                                         "rejected": f"{b.upper()}! {a.upper()}!"}) + "\n"
                             for a, b in zip(words, words[1:] + words[:1])))
    recipe = json.loads(json.dumps(runs["recipe_data"]))
    recipe["stages"] = ["generate", "dedup", "curate", "train", "preference", "eval", "export"]
    recipe["preference"] = {"model": recipe["train"]["model"], "data": {"train_files": [str(pairs)], "max_len": 64},
                            "optimizer": {"learning_rate": 1.0e-3}, "preference": {"beta": 0.1},
                            "train": {"seed": 0, "max_steps": 2, "batch_size": 2, "log_every": 1,
                                      "progress_bar": False},
                            "checkpoint": {"every": None}, "run": {"tensorboard": False}}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    log = _run(path, "dedup.threshold=0.71", "--until", "preference").stderr
    for stage in ("generate", "dedup", "curate", "train"):
        assert _lines(log, f"{stage}: skipped (done"), (stage, log[-2000:])
    assert _lines(log, "preference: running (pending: not run yet)")
    recipe_dir = runs["dir"]
    manifest = json.loads((recipe_dir / "preference" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["inputs"]["model"].startswith("train:")
    assert manifest["inputs"]["data.train_files[0]"]  # the pairs file, hashed
    config = yaml.safe_load((recipe_dir / "preference" / "run" / "config.yaml").read_text())
    assert config["model"]["init_from"] == str(recipe_dir / "train" / "run")
    assert config["preference"]["reference"] is None  # the starting weights, frozen
    metrics = _metrics(recipe_dir / "preference" / "run")
    assert abs(metrics[0]["loss"] - math.log(2)) < 1e-5 and abs(metrics[0]["rewards/margins"]) < 1e-5
    assert "![preference (DPO) loss](loss_preference.png)" in (recipe_dir / "report.md").read_text()
    again = _run(path, "dedup.threshold=0.71", "--until", "preference").stderr
    assert _lines(again, "preference: skipped (done"), again[-2000:]
