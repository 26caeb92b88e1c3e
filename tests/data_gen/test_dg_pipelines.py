"""Both pipelines end to end: the real `openai` client against a scripted local server."""

from __future__ import annotations

import json

import pytest

from alpaca_jax.configlib import ConfigError
from alpaca_jax.llm.client import TeacherFatalError
from data_gen.config import load_config
from data_gen.generate import generate
from data_gen.seeds import load_seed_tasks

CONFIGS = {"alpaca": "configs/generate/alpaca.yaml", "self-instruct": "configs/generate/self_instruct.yaml"}


def _config(repo, pipeline, server, out, seed_file, *extra):
    return load_config(repo / CONFIGS[pipeline], [
        f"teacher.base_url={server.url}", "teacher.timeout_s=0.5", "teacher.backoff_initial_s=0.01",
        "teacher.backoff_max_s=0.05", "teacher.max_concurrency=4", f"output.dir={out}",
        "output.progress=false", f"pipeline.seed_tasks={seed_file}", "pipeline.num_instructions=40",
        *extra])


@pytest.fixture
def repo():
    from pathlib import Path
    return Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "dummy-key-for-local-server")


def _data(out):
    return json.loads((out / "data.json").read_text())


@pytest.mark.parametrize("pipeline", ["alpaca", "self-instruct"])
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_pipeline_survives_faults_and_matches_a_clean_run(repo, tmp_path, fake_server, seed_file, pipeline, api):
    clean = fake_server()
    faulty = fake_server(fault_rate=0.5, stall_s=0.8)
    clean_report = generate(_config(repo, pipeline, clean, tmp_path / "clean", seed_file, f"teacher.api={api}"))
    report = generate(_config(repo, pipeline, faulty, tmp_path / "faulty", seed_file, f"teacher.api={api}"))
    data = _data(tmp_path / "faulty")
    assert data == _data(tmp_path / "clean")           # retries hide every transient fault
    assert report["this_run"]["retries"] > 0 and report["this_run"]["failed"] == 0
    errors = set(report["this_run"]["errors"])
    assert errors <= {"RateLimitError", "InternalServerError", "APITimeoutError", "APIConnectionError"}
    if pipeline == "self-instruct":  # enough requests to meet every kind of fault
        assert {"RateLimitError", "InternalServerError", "APITimeoutError", "APIConnectionError"} == errors
    assert report["stop_reason"] == "target reached"
    assert report["dropped"] == clean_report["dropped"]
    assert report["dropped"].get("near_duplicate", 0) > 0
    assert report["tokens"]["total"] > 0 and report["requests"]["completed_total"] > 0
    assert all(set(e) == {"instruction", "input", "output"} and e["output"] for e in data)
    instructions = [e["instruction"] for e in data]
    if pipeline == "alpaca":
        assert len(data) == 40 and len(set(instructions)) == 40
    else:
        assert len(set(instructions)) <= 40 < len(data)  # several instances per instruction
        assert report["classification_tasks"] > 0
    # the report says why every candidate was dropped
    assert sum(report["dropped"].values()) > 0
    assert sum(report["similarity_histogram"]["counts"]) > 0


def test_garbage_responses_are_counted_and_skipped(repo, tmp_path, fake_server, seed_file):
    server = fake_server(garbage_rate=0.3)
    report = generate(_config(repo, "self-instruct", server, tmp_path, seed_file))
    assert report["this_run"]["garbage"] > 0 and report["requests"]["garbage_total"] == report["this_run"]["garbage"]
    assert report["dropped"]["unparseable_response"] > 0
    garbage_ids = {e["rid"] for e in server.log if e["outcome"] == "garbage"}
    assert all(sum(e["rid"] == rid for e in server.log) == 1 for rid in garbage_ids)  # never re-sent
    assert _data(tmp_path)


def test_resume_replays_the_journal_without_network(repo, tmp_path, fake_server, seed_file):
    server = fake_server()
    first = generate(_config(repo, "alpaca", server, tmp_path, seed_file))
    first_data = _data(tmp_path)
    sent = len(server.log)
    second = generate(_config(repo, "alpaca", server, tmp_path, seed_file))
    assert len(server.log) == sent and second["this_run"]["sent"] == 0
    assert second["this_run"]["from_journal"] == first["requests"]["completed_total"]
    # raising the target continues from where the journal ends
    third = generate(_config(repo, "alpaca", server, tmp_path, seed_file, "pipeline.num_instructions=80"))
    assert third["kept"] == 80 and _data(tmp_path)[:40] == first_data
    assert len(server.log) > sent


def test_token_budget_stops_cleanly(repo, tmp_path, fake_server, seed_file):
    server = fake_server()
    report = generate(_config(repo, "alpaca", server, tmp_path, seed_file, "pipeline.num_instructions=1000",
                              "budget.max_tokens=5000", "pipeline.requests_per_round=1"))
    assert report["stop_reason"].startswith("token budget reached")
    assert 5000 <= report["tokens"]["total"] < 5000 + 4000   # at most one request past the cap
    assert 0 < report["kept"] == len(_data(tmp_path)) < 1000


def test_cost_budget_uses_the_price_table(repo, tmp_path, fake_server, seed_file):
    server = fake_server()
    report = generate(_config(repo, "alpaca", server, tmp_path, seed_file, "pipeline.num_instructions=1000",
                              "budget.max_cost_usd=0.01", "pipeline.requests_per_round=1"))
    assert report["stop_reason"].startswith("cost budget reached") and report["tokens"]["cost_usd"] >= 0.01
    with pytest.raises(ConfigError, match="budget.prices"):
        load_config(repo / CONFIGS["alpaca"], ["teacher.model=unpriced", "budget.max_cost_usd=1"])


def test_original_seed_pool_is_accepted_unchanged(shared_data):
    tasks = load_seed_tasks(shared_data / "seed_tasks.jsonl")
    assert len(tasks) == 175 and sum(t.is_classification for t in tasks) == 26


def test_missing_api_key_is_a_clear_error(repo, tmp_path, fake_server, seed_file, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(TeacherFatalError, match="OPENAI_API_KEY"):
        generate(_config(repo, "alpaca", fake_server(), tmp_path, seed_file))
