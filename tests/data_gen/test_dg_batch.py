"""teacher.mode=batch against the fake Batch API (files, batches, status steps, output and error
files, expired rows) through the real `openai` client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from data_gen.batch import BatchTeacher
from alpaca_jax.llm.budget import Budget
from data_gen.config import BatchConfig, BudgetConfig, TeacherConfig, load_config
from data_gen.generate import generate
from alpaca_jax.llm.journal import Journal
from alpaca_jax.llm.client import Request, TeacherFatalError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "dummy-key-for-local-server")


def _overrides(server, out, seed_file, *extra):
    return [f"teacher.base_url={server.url}", "teacher.timeout_s=5", "teacher.backoff_initial_s=0.01",
            "teacher.backoff_max_s=0.05", "teacher.max_concurrency=4", f"output.dir={out}",
            "output.progress=false", f"pipeline.seed_tasks={seed_file}", "batch.poll_interval_s=0.01", *extra]


def _paid(server) -> Counter:
    """Answered rows by request id, online and in batches together."""
    return Counter(e["rid"] for e in server.log if e["outcome"] == "ok")


@pytest.mark.parametrize("retry", ["online", "next_batch"])
def test_batch_rows_equal_online_rows_and_expired_rows_are_retried(tmp_path, fake_server, seed_file, retry):
    config = REPO / "configs/generate/self_instruct.yaml"
    online = fake_server()
    batched = fake_server(expire_rate=0.15)
    common = ["pipeline.num_instructions=25", "pipeline.requests_per_round=2"]
    generate(load_config(config, _overrides(online, tmp_path / "online", seed_file, *common)))
    report = generate(load_config(config, _overrides(batched, tmp_path / "batch", seed_file, *common,
                                                     "teacher.mode=batch", f"batch.retry={retry}")))
    data = json.loads((tmp_path / "batch" / "data.json").read_text())
    assert data == json.loads((tmp_path / "online" / "data.json").read_text()) and len(data) > 25
    assert report["stop"] == "target"
    expired = {json.loads(line)["custom_id"] for b in batched.batches if b["error_file_id"]
               for line in batched._files[b["error_file_id"]].decode().splitlines()}
    assert expired and {b["status"] for b in batched.batches} == {"completed", "expired"}
    online_calls = {e["rid"] for e in batched.log if "batch" not in e}
    if retry == "online":
        assert online_calls == expired                     # exactly the expired rows, online
    else:
        assert not online_calls                            # every row through a batch
        second = {e["rid"] for e in batched.log if e.get("batch") and e["rid"] in expired}
        assert second == expired
    assert max(_paid(batched).values()) == 1               # no row paid twice
    assert set(_paid(batched)) == set(_paid(online))       # the same requests as online
    assert report["batch"]["submitted"] == len(batched.batches) and report["batch"]["resumed"] == 0


def _command(server, out, seed_file):
    return [sys.executable, "-m", "data_gen", "generate", str(REPO / "configs/generate/alpaca.yaml"),
            *_overrides(server, out, seed_file, "teacher.mode=batch", "pipeline.num_instructions=40",
                        "pipeline.requests_per_round=3", "batch.poll_interval_s=0.02")]


def test_sigkill_while_polling_resumes_the_same_batch(tmp_path, fake_server, seed_file):
    server = fake_server(expire_rate=0.2)
    server.batch_steps = 10 ** 9                           # the batch stays "validating"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "out"
    process = subprocess.Popen(_command(server, out, seed_file), env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while server.polls < 5 and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert server.polls >= 5 and len(server.batches) == 1
    first = server.batches[0]["id"]
    server.batch_steps = 1
    done = subprocess.run(_command(server, out, seed_file), env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["batch"]["resumed"] == 1 and server.batches[0]["status"] in ("completed", "expired")
    inputs = [frozenset(json.loads(line)["custom_id"]
                        for line in server._files[b["input_file_id"]].decode().splitlines())
              for b in server.batches]
    assert len(set(inputs)) == len(inputs)                 # no batch submitted twice
    assert all(not (a & b) for i, a in enumerate(inputs) for b in inputs[i + 1:])
    assert max(_paid(server).values()) == 1                # no row paid twice
    assert sum(e.get("batch") == first for e in server.log) > 0
    reference = fake_server()
    generate(load_config(REPO / "configs/generate/alpaca.yaml",
                         _overrides(reference, tmp_path / "ref", seed_file, "pipeline.num_instructions=40",
                                    "pipeline.requests_per_round=3")))
    assert (json.loads((out / "data.json").read_text())
            == json.loads((tmp_path / "ref" / "data.json").read_text()))


def test_a_kill_between_create_and_journaling_finds_the_batch_by_its_metadata(tmp_path, fake_server, monkeypatch):
    server = fake_server()
    config = TeacherConfig(model="m", api="chat", base_url=server.url)
    requests = [Request.build(f"k/{i}", f"Prompt {i}", {"max_tokens": 8}, []) for i in range(5)]

    def open_teacher():
        journal = Journal(tmp_path / "journal.jsonl")
        return journal, BatchTeacher(config, BatchConfig(poll_interval_s=0.01), journal,
                                     Budget(BudgetConfig(), "m"))

    journal, teacher = open_teacher()
    append = teacher.batches.append

    def dies_before_the_id_is_written(record):
        if record.get("batch_id"):
            raise KeyboardInterrupt           # as if the process were killed at this point
        append(record)

    monkeypatch.setattr(teacher.batches, "append", dies_before_the_id_is_written)
    with pytest.raises(KeyboardInterrupt):
        teacher.complete(requests)
    teacher.close()
    journal.close()
    assert len(server.batches) == 1
    journal, teacher = open_teacher()
    answers = teacher.complete(requests)
    assert len(server.batches) == 1 and teacher.batch_stats == {**teacher.batch_stats, "submitted": 0, "resumed": 1}
    assert all(answers[r.key] is not None and answers[r.key].text for r in requests)
    assert max(_paid(server).values()) == 1
    teacher.close()
    journal.close()


def test_max_wait_stops_polling_and_a_later_run_resumes_the_batch(tmp_path, fake_server, seed_file):
    server = fake_server()
    server.batch_steps = 10 ** 9
    config = load_config(REPO / "configs/generate/alpaca.yaml", _overrides(
        server, tmp_path, seed_file, "teacher.mode=batch", "pipeline.num_instructions=10",
        "pipeline.requests_per_round=2", "batch.max_wait_s=0.2"))
    with pytest.raises(TeacherFatalError, match="rerun the same command to resume"):
        generate(config)
    assert len(server.batches) == 1 and not (tmp_path / "data.json").exists()
    server.batch_steps = 1                                 # "days later" the batch is done
    report = generate(config)
    assert report["stop"] == "target" and report["batch"]["resumed"] == 1
    assert server.batches[0]["status"] == "completed" and max(_paid(server).values()) == 1
