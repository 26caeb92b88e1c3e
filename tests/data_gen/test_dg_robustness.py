"""A dead or broken teacher ends the run quickly with one line; budget stops write what is
complete; each stage's requests carry Self-Instruct's sampling. All through the `generate`
command (in process) and the real `openai` client against the test's own server."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from data_gen.cli import EXIT_CODES, main

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {"alpaca": REPO / "configs/generate/alpaca.yaml",
           "self-instruct": REPO / "configs/generate/self_instruct.yaml"}
# Short retries, so a dead endpoint costs a few seconds.
FAST = ["teacher.timeout_s=0.5", "teacher.max_retries=1", "teacher.backoff_initial_s=0.01",
        "teacher.backoff_max_s=0.02", "teacher.max_concurrency=4", "output.progress=false"]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "dummy-key-for-local-server")


def _generate(capsys, pipeline: str, url: str, out: Path, *extra: str) -> tuple[int, list[str], dict]:
    code = main(["generate", str(CONFIGS[pipeline]), f"teacher.base_url={url}", f"output.dir={out}",
                 *FAST, *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    report = json.loads((out / "report.json").read_text())
    return code, lines, report


def _rounds_of(log: list[dict], stage: str) -> list[dict]:
    starts = {"alpaca": "You are asked", "bootstrap": "Come up with a series",
              "classify": "For each task, say", "instances": ("Each task below", "Write examples")}[stage]
    return [e for e in log if e["prompt"].startswith(starts)]


@pytest.mark.parametrize("pipeline", ["alpaca", "self-instruct"])
def test_closed_port_stops_with_one_line(tmp_path, capsys, dead_url, pipeline):
    url = dead_url
    start = time.monotonic()
    code, lines, report = _generate(capsys, pipeline, url, tmp_path, "pipeline.num_instructions=20")
    assert time.monotonic() - start < 20
    assert code == EXIT_CODES["no_progress"] == 1
    assert len(lines) == 1 and lines[0].startswith("error: no progress from the teacher at " + url)
    assert "APIConnectionError" in lines[0] and "rerun" in lines[0]
    assert report["stop"] == "no_progress" and report["kept"] == 0
    # max_idle_rounds (3) rounds of requests_per_round (5), each tried 1 + max_retries times
    assert report["this_run"]["sent"] == 3 * 5 * 2 and report["this_run"]["failed"] == 15


@pytest.mark.parametrize("pipeline", ["alpaca", "self-instruct"])
def test_closed_port_with_default_retries_stops_within_a_minute(tmp_path, capsys, dead_url, pipeline):
    """The shipped retry settings (8 retries, backoff up to 60 s) would spend minutes per request
    on a refused connection; an endpoint never reached gets teacher.max_connect_retries (2)."""
    start = time.monotonic()
    code = main(["generate", str(CONFIGS[pipeline]), f"teacher.base_url={dead_url}", f"output.dir={tmp_path}",
                 "output.progress=false"])
    elapsed = time.monotonic() - start
    lines = capsys.readouterr().err.strip().splitlines()
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 1 and len(lines) == 1 and "APIConnectionError" in lines[0]
    assert elapsed < 60, elapsed
    assert report["this_run"]["retries"] == 2 * report["this_run"]["failed"]  # max_connect_retries each


def test_dead_teacher_keeps_the_journal_and_a_rerun_resumes(tmp_path, capsys, fake_server, dead_url):
    server = fake_server()
    one = "pipeline.requests_per_round=1"
    code, _, first = _generate(capsys, "alpaca", server.url, tmp_path, one, "pipeline.num_instructions=20")
    assert code == 0 and first["stop"] == "target"
    journal = (tmp_path / "journal.jsonl").read_bytes()
    code, lines, _ = _generate(capsys, "alpaca", dead_url, tmp_path, one, "pipeline.num_instructions=60")
    assert code == 1 and len(lines) == 1 and "APIConnectionError" in lines[0]
    assert (tmp_path / "journal.jsonl").read_bytes() == journal
    sent = len(server.log)
    code, _, resumed = _generate(capsys, "alpaca", server.url, tmp_path, one, "pipeline.num_instructions=60")
    assert code == 0 and resumed["kept"] == 60
    assert resumed["this_run"]["from_journal"] == first["requests"]["completed_total"]
    assert len(server.log) - sent == resumed["this_run"]["sent"] > 0   # journaled ones not sent again


@pytest.mark.parametrize("kind", ["not_json", "no_choices", "no_task"])
def test_all_garbage_teacher_stops_after_a_bounded_number_of_requests(tmp_path, capsys, fake_server, kind):
    server = fake_server(garbage_rate=1.0, garbage_kind=kind)
    code, lines, report = _generate(capsys, "alpaca", server.url, tmp_path, "pipeline.num_instructions=50",
                                    "pipeline.requests_per_round=3", "pipeline.max_idle_rounds=2")
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: no progress")
    assert len(server.log) == 2 * 3                   # two idle rounds of three requests, no retries
    assert report["kept"] == 0
    if kind == "no_task":                             # well-formed replies that hold no task
        assert report["requests"]["garbage_total"] == 0 and report["unusable_answers"] == 6
        assert "without a task" in lines[0] and "Sorry, I cannot help" in lines[0]
    else:
        assert report["requests"]["garbage_total"] == report["this_run"]["garbage"] == 6
        assert report["dropped"]["unparseable_response"] == 6 and "6 garbage" in lines[0]
        assert "garbage response" in lines[0]


def test_garbage_self_instruct_teacher_stops_in_stage_1(tmp_path, capsys, fake_server):
    server = fake_server(garbage_rate=1.0)
    code, lines, report = _generate(capsys, "self-instruct", server.url, tmp_path,
                                    "pipeline.num_instructions=50", "pipeline.requests_per_round=2")
    assert code == 1 and len(lines) == 1 and "stage 1" in lines[0]
    assert len(server.log) == 3 * 2 and report["requests"]["garbage_total"] == 6


def test_budget_stop_writes_every_completed_task(tmp_path, capsys, fake_server):
    server = fake_server()
    common = ["pipeline.num_instructions=30", "pipeline.requests_per_round=2"]
    code, _, full = _generate(capsys, "self-instruct", server.url, tmp_path / "full", *common)
    reference = json.loads((tmp_path / "full" / "data.json").read_text())
    assert code == 0 and full["incomplete_tasks"] == 0

    server = fake_server()
    cap = full["requests"]["completed_total"] // 2     # runs out in the middle of a later round
    out = tmp_path / "capped"
    code, lines, report = _generate(capsys, "self-instruct", server.url, out, *common,
                                    f"budget.max_requests={cap}")
    assert code == EXIT_CODES["budget"] == 3
    assert len(lines) == 1 and lines[0].startswith(f"stopped: request budget reached ({cap} >= {cap})")
    assert len(server.log) == cap                      # in-flight requests never overshoot the cap
    data = json.loads((out / "data.json").read_text())
    # Every task whose stages are complete is written, exactly as the uninterrupted run has it.
    assert 0 < len(data) < len(reference) and data == reference[: len(data)]
    assert report["stop"] == "budget" and report["incomplete_tasks"] > 0

    code, _, resumed = _generate(capsys, "self-instruct", server.url, out, *common)
    assert code == 0 and json.loads((out / "data.json").read_text()) == reference
    assert resumed["this_run"]["from_journal"] == cap


def test_max_rounds_before_the_target_has_its_own_code(tmp_path, capsys, fake_server):
    code, lines, report = _generate(capsys, "alpaca", fake_server().url, tmp_path,
                                    "pipeline.num_instructions=500", "pipeline.max_rounds=1")
    assert code == EXIT_CODES["max_rounds"] == 4 and len(lines) == 1 and "max_rounds" in lines[0]
    assert 0 < report["kept"] == len(json.loads((tmp_path / "data.json").read_text())) < 500


def test_each_stage_samples_as_self_instruct(tmp_path, capsys, fake_server):
    server = fake_server()
    code, _, report = _generate(capsys, "self-instruct", server.url, tmp_path,
                                "pipeline.num_instructions=12", "pipeline.requests_per_round=2")
    assert code == 0 and report["classification_tasks"] > 0

    def sampling(entry):
        return {k: entry["body"].get(k) for k in ("temperature", "top_p", "max_tokens",
                                                  "presence_penalty", "frequency_penalty", "stop")}

    for entry in _rounds_of(server.log, "bootstrap"):
        assert sampling(entry) == {"temperature": 0.7, "top_p": 0.5, "max_tokens": 1024, "presence_penalty": 2.0,
                                   "frequency_penalty": 0.0, "stop": ["\n\n", "\n16", "16.", "16 ."]}
    classify = _rounds_of(server.log, "classify")
    assert len(classify) == report["instructions"]
    for entry in classify:
        assert sampling(entry) == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 3, "presence_penalty": 0.0,
                                   "frequency_penalty": 0.0, "stop": ["\n", "Task"]}
    instances = _rounds_of(server.log, "instances")
    assert len(instances) == report["instructions"]
    for entry in instances:
        classification = entry["prompt"].startswith("Each task below is a classification task")
        assert sampling(entry) == {"temperature": 0.0, "top_p": 1.0, "presence_penalty": 1.5,
                                   "frequency_penalty": 0.0, "max_tokens": 300 if classification else 350,
                                   "stop": ["Example 6", "Task:"]}
    assert {e["prompt"].startswith("Each task below") for e in instances} == {True, False}


def _demonstrations(prompt: str) -> list[str]:
    """The demonstration blocks of a stage 3 prompt (header and the asked task left out)."""
    return [block for block in prompt.split("\n\n")[1:]
            if block.startswith("Task:") and len(block.splitlines()) > 1]


def test_stage_3_prompt_shows_several_instances_per_demonstration(tmp_path, capsys, fake_server):
    server = fake_server()
    _generate(capsys, "self-instruct", server.url, tmp_path, "pipeline.num_instructions=12",
              "pipeline.requests_per_round=2")
    prompts = {e["prompt"].startswith("Each task below"): e["prompt"] for e in _rounds_of(server.log, "instances")}
    classification, generation = _demonstrations(prompts[True]), _demonstrations(prompts[False])
    assert len(classification) >= 4 and len(generation) >= 4
    for block in classification:
        lines = block.splitlines()
        assert lines[1].startswith("Class label: ")              # output first
    assert sum(block.count("Class label:") >= 2 for block in classification) >= 4
    for block in generation:
        numbers = [int(n) for n in re.findall(r"^Example (\d+)$", block, flags=re.MULTILINE)]
        assert numbers == list(range(1, len(numbers) + 1))
    assert sum(block.count("\nExample ") >= 2 for block in generation) >= 4
    # inputs under task-specific field names, not a generic "Input:"
    fields = set(re.findall(r"^([A-Z][a-z]+(?: \d)?): ", prompts[True] + prompts[False], flags=re.MULTILINE))
    assert {"Sentence", "Review", "Word"} <= fields and "Input" not in fields


def test_alpaca_requests_stop_at_task_20(tmp_path, capsys, fake_server):
    server = fake_server()
    code, _, _ = _generate(capsys, "alpaca", server.url, tmp_path, "pipeline.num_instructions=20")
    assert code == 0
    for entry in _rounds_of(server.log, "alpaca"):
        assert entry["body"]["stop"] == ["\n20", "20."] and "List of 20 tasks" in entry["prompt"]
    # The server honours stop sequences, so a reply ends with task 19 at most (16 new after 3
    # demos); a reply cut by max_tokens ends earlier.
    last = []
    for record in map(json.loads, (tmp_path / "journal.jsonl").read_text().splitlines()):
        last.append(max(int(n) for n in re.findall(r"^(\d+)\. Instruction:", record["text"], flags=re.MULTILINE)))
    assert max(last) == 19 and last.count(19) >= len(last) // 2


def test_failed_stage_2_and_3_requests_leave_tasks_for_a_rerun(tmp_path, capsys, fake_server):
    common = ["pipeline.num_instructions=20", "pipeline.requests_per_round=2"]
    code, _, _ = _generate(capsys, "self-instruct", fake_server().url, tmp_path / "clean", *common)
    reference = json.loads((tmp_path / "clean" / "data.json").read_text())
    assert code == 0
    # Every request's first two attempts fail with probability 0.3; with no retries some stage 2
    # and 3 requests fail, and their tasks must not be written half-done.
    server = fake_server(fault_rate=0.3, kinds=("server_error",))
    out = tmp_path / "faulty"
    codes, lines = [], []
    for _ in range(4):
        code, lines, report = _generate(capsys, "self-instruct", server.url, out, *common, "teacher.max_retries=0")
        codes.append(code)
        if code == 0:
            break
        assert code == 1 and len(lines) == 1 and "lack a stage 2 or 3 answer" in lines[0]
        assert report["incomplete_tasks"] > 0
    assert codes[0] == 1 and codes[-1] == 0
    assert json.loads((out / "data.json").read_text()) == reference
