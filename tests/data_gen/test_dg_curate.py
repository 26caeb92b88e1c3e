"""`curate`: a fake judge on 127.0.0.1 scores rows by a rule of this file; the kept rows, the
scores and the unparseable count are checked against that rule, row by row."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from data_gen.cli import main
from data_gen.config import load_config
from data_gen.generate import generate

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("_dg_curate_fake", Path(__file__).with_name("fake_openai.py"))
fake_openai = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_openai)
_SHOWN = re.compile(r"### Instruction\n(.*)\n\n### Input\n(.*)\n\n### Response\n(.*)\n\nGive a short", re.DOTALL)
# Replies whose final line is not a score the prompt asked for: the judge's own words.
_UNPARSEABLE = ("Score: excellent", "Score: 4.5\nI hope this helps.", "Score: 9", "The response is fine.")
_SCORES = (1, 2, 3, 3.5, 4, 4.5, 5, 4.7)


def _h(*parts) -> int:
    return int(hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:12], 16)


def policy(instruction: str, output: str) -> float | str:
    """The fake judge's score for a row, or the text of an unparseable reply."""
    h = _h(instruction, output)
    return _UNPARSEABLE[h // 10 % 4] if h % 10 == 0 else _SCORES[h // 10 % len(_SCORES)]


def judge_reply(prompt: str):
    instruction, _, output = _SHOWN.search(prompt).groups()
    verdict = policy(instruction, output)
    if isinstance(verdict, str):
        return f"The answer is mostly right.\n{verdict}", "stop"
    return f"The answer is mostly right.\nScore: {verdict}", "stop"


def _rows(n: int) -> list[dict]:
    return [{"instruction": f"Summarize item {i} in one sentence.", "input": "" if i % 3 else f"Item {i} text.",
             "output": f"Item {i} is summarized here with {i % 7} words."} for i in range(n)]


def _judge_config(tmp_path, url: str) -> Path:
    path = tmp_path / "judge.yaml"
    path.write_text(yaml.safe_dump({"judge": {"model": "fake-judge", "api": "chat", "base_url": url,
                                              "max_concurrency": 2, "max_retries": 1, "max_connect_retries": 0,
                                              "backoff_initial_s": 0.01, "backoff_max_s": 0.02, "timeout_s": 5.0},
                                    "sampling": {"temperature": 0.0, "max_tokens": 64}}))
    return path


def _expected(rows, min_score):
    verdicts = [policy(r["instruction"], r["output"]) for r in rows]
    kept = [r for r, v in zip(rows, verdicts) if not isinstance(v, str) and v >= min_score]
    scores = [None if isinstance(v, str) else float(v) for v in verdicts]
    return kept, scores, sum(isinstance(v, str) for v in verdicts)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "dummy-key-for-local-server")


@pytest.mark.parametrize("min_score", [4.5, 3.5])
def test_curate_keeps_exactly_the_rows_scored_at_least_the_threshold(tmp_path, fake_server, min_score):
    rows = _rows(120)
    data = tmp_path / "alpaca_data.json"
    data.write_text(json.dumps(rows))
    server = fake_server(reply=judge_reply)
    out = tmp_path / "kept.json"
    assert main(["curate", str(data), "-o", str(out), "--judge", str(_judge_config(tmp_path, server.url)),
                 "--min-score", str(min_score)]) == 0
    kept, scores, unparseable = _expected(rows, min_score)
    assert json.loads(out.read_text()) == kept and 0 < len(kept) < len(rows)
    written = [json.loads(line) for line in (tmp_path / "kept.scores.jsonl").read_text().splitlines()]
    assert [w.pop("score") for w in written] == scores and written == rows
    report = json.loads((tmp_path / "kept.report.json").read_text())
    assert report["unparseable"] == unparseable > 0 and report["kept"] == len(kept)
    assert sum(report["histogram"]["counts"]) == len(rows) - unparseable
    assert report["histogram"]["counts"][-1] == sum(s is not None and s >= 4.5 for s in scores)


def test_curate_reads_the_released_format(tmp_path, fake_server, shared_data):
    rows = json.loads((shared_data / "alpaca_en_demo.json").read_text())[:40]
    data = tmp_path / "demo.json"
    data.write_text(json.dumps(rows))
    server = fake_server(reply=judge_reply)
    assert main(["curate", str(data), "-o", str(tmp_path / "k.json"), "--judge",
                 str(_judge_config(tmp_path, server.url))]) == 0
    assert json.loads((tmp_path / "k.json").read_text()) == _expected(rows, 4.5)[0]


def test_curate_rerun_after_sigkill_pays_nothing_twice(tmp_path, fake_server):
    rows = _rows(150)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))   # JSONL works too
    server = fake_server(reply=judge_reply, latency_s=0.01)
    out = tmp_path / "kept.json"
    command = [sys.executable, "-m", "data_gen", "curate", str(data), "-o", str(out),
               "--judge", str(_judge_config(tmp_path, server.url))]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    journal = tmp_path / "kept.journal.jsonl"
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None and (
            not journal.exists() or journal.read_text().count("\n") < 40):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    paid_before = journal.read_text().count("\n")
    assert 40 <= paid_before < len(rows) and not out.exists()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == _expected(rows, 4.5)[0]
    answered = Counter(e["rid"] for e in server.log if e["outcome"] == "ok")
    assert len(answered) == len(rows)
    # At most the requests in flight when the kill landed (max_concurrency=2) were answered twice.
    assert sum(answered.values()) - len(rows) <= 2
    report = json.loads((tmp_path / "kept.report.json").read_text())
    assert report["this_run"]["from_journal"] >= paid_before and report["unparseable"] == _expected(rows, 4.5)[2]


def test_curation_as_a_stage_of_generate(tmp_path, fake_server, seed_file):
    def teacher(prompt):
        return judge_reply(prompt) if "### Response" in prompt else fake_openai.scripted_reply(prompt)

    server = fake_server(reply=teacher)
    config = load_config(REPO / "configs/generate/alpaca.yaml", [
        f"teacher.base_url={server.url}", f"output.dir={tmp_path}", "output.progress=false",
        f"pipeline.seed_tasks={seed_file}", "pipeline.num_instructions=30", "curation.enabled=true",
        "curation.min_score=4"])
    report = generate(config)
    rows = json.loads((tmp_path / "data.json").read_text())
    assert len(rows) == 30
    kept, _, unparseable = _expected(rows, 4.0)
    assert json.loads((tmp_path / "curated.json").read_text()) == kept
    assert report["curation"]["kept"] == len(kept) and report["curation"]["unparseable"] == unparseable
