"""A committee of teachers: fake servers on 127.0.0.1 through the real `openai` client.

The expected assignment is computed here from the documented rule (data_gen/committee.py's
docstring: u from sha256(f"{seed}/{key}"), the first teacher whose cumulative weight share
exceeds u), with numpy, not by calling the planner. Each fake teacher marks its answers with
its own name, so a row's text says who really wrote it, independently of the provenance field.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import threading
from collections import Counter
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_gen.config import load_config
from data_gen.generate import generate

_spec = importlib.util.spec_from_file_location("_dg_committee_fake", __file__.replace("test_dg_committee", "fake_openai"))
fake_openai = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_openai)

TIE = "I read both answers; they look equally fine to me."


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "dummy-key-for-local-server")


def _u(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) / 16 ** 16


def _expected(seed: int, key: str, weights: dict[str, float]) -> str:
    names = list(weights)
    cumulative = np.cumsum(list(weights.values())) / np.sum(list(weights.values()))
    return names[int(np.searchsorted(cumulative, _u(f"{seed}/{key}"), side="right"))]


def _tagged(name: str):
    """The scripted reply with every output (Alpaca) and input (instances) led by the name."""
    def reply(prompt: str):
        text, finish = fake_openai.scripted_reply(prompt)
        return text.replace("Output:\n", f"Output:\n{name} ").replace("Input: ", f"Input: {name} "), finish
    return reply


def _config(tmp_path, servers: dict, weights: dict, committee: dict, seed_file, *overrides):
    teachers = [{"name": n, "model": f"model-{n}", "api": "completions", "base_url": servers[n].url,
                 "weight": weights[n], "max_concurrency": 4, "max_retries": 1, "max_connect_retries": 0,
                 "backoff_initial_s": 0.01, "backoff_max_s": 0.02, "timeout_s": 5.0} for n in servers]
    path = tmp_path / "committee.yaml"
    path.write_text(yaml.safe_dump({"teachers": teachers, "committee": committee}))
    return load_config(path, [f"output.dir={tmp_path / 'out'}", "output.progress=false",
                              f"pipeline.seed_tasks={seed_file}", *overrides])


def _journal_keys(tmp_path) -> dict[str, str]:
    lines = (tmp_path / "out" / "journal.jsonl").read_text().splitlines()
    return {r["id"]: r["key"] for r in map(json.loads, lines)}


def _served(servers, keys_by_id) -> dict[str, str]:
    served = {}
    for name, server in servers.items():
        for rid in server.completed_ids():
            assert keys_by_id[rid] not in served, "a request was answered twice"
            served[keys_by_id[rid]] = name
    return served


def test_weighted_plan_holds_over_1000_requests_with_provenance_on_every_row(tmp_path, fake_server, seed_file):
    weights = {"t1": 0.5, "t2": 0.3, "t3": 0.2}
    servers = {n: fake_server(reply=_tagged(n)) for n in weights}
    config = _config(tmp_path, servers, weights, {"assign": "weighted", "seed": 7}, seed_file,
                     "pipeline.requests_per_round=50", "pipeline.max_rounds=20",
                     "pipeline.num_instructions=1000000", "dedup.enabled=false")
    report = generate(config)
    assert report["stop"] == "max_rounds"
    keys = [f"alpaca/{r}/{i}" for r in range(20) for i in range(50)]
    served = _served(servers, _journal_keys(tmp_path))
    assert served == {key: _expected(7, key, weights) for key in keys}
    counts = Counter(served.values())
    assert counts["t1"] > counts["t2"] > counts["t3"] > 150          # 500/300/200 expected
    rows = json.loads((tmp_path / "out" / "data.json").read_text())
    assert len(rows) > 5000
    for row in rows:
        who = row["provenance"]["instructions"]
        assert row["output"].startswith(who["teacher"] + " ") and who["model"] == f"model-{who['teacher']}"
    assert report["committee"]["dropped"] == {}
    assert {n: t["answered"] for n, t in report["committee"]["teachers"].items()} == dict(counts)


def test_a_teacher_killed_mid_run_hands_its_work_to_the_others(tmp_path, fake_server, seed_file):
    weights = {"t1": 0.5, "t2": 0.3, "t3": 0.2}
    servers = {n: fake_server(reply=_tagged(n)) for n in weights}
    answered = []
    lock = threading.Lock()

    def dies_after_40(prompt):
        with lock:
            answered.append(prompt)
            if len(answered) == 40:
                servers["t2"].kill()
        return _tagged("t2")(prompt)

    servers["t2"].reply = dies_after_40
    config = _config(tmp_path, servers, weights, {"seed": 3}, seed_file,
                     "pipeline.requests_per_round=30", "pipeline.max_rounds=10",
                     "pipeline.num_instructions=1000000", "dedup.enabled=false")
    report = generate(config)
    assert report["stop"] == "max_rounds"                             # every round ran
    keys = [f"alpaca/{r}/{i}" for r in range(10) for i in range(30)]
    served = _served(servers, _journal_keys(tmp_path))
    assert sorted(served) == sorted(keys)                             # every request answered once
    assert 40 <= Counter(served.values())["t2"] < 50                  # t2 answered until it died
    survivors = {"t1": 0.5, "t2": 0.0, "t3": 0.2}
    moved = [k for k in keys if _expected(3, k, weights) == "t2" and served[k] != "t2"]
    assert len(moved) > 30
    for key in keys:
        if served[key] == "t2" or _expected(3, key, weights) != "t2":
            assert served[key] == _expected(3, key, weights)
        else:                                                         # re-planned among the living
            assert served[key] == _expected(3, key, survivors)
    assert "t2" in report["committee"]["dropped"] and "failed" in report["committee"]["dropped"]["t2"]
    rows = json.loads((tmp_path / "out" / "data.json").read_text())
    assert all(r["output"].startswith(r["provenance"]["instructions"]["teacher"] + " ") for r in rows)


class _Judge:
    """Picks Answer 1 or 2 by a hash of the two answers; no verdict line for about 1 in 6."""

    _SHOWN = re.compile(r"### Request\n(.*)\n\n### Answer 1\n(.*)\n\n### Answer 2\n(.*)\n\nExplain", re.DOTALL)

    def __init__(self):
        self.seen: list[tuple[str, str, str, int | None]] = []   # (instruction, answer 1, answer 2, verdict)
        self._lock = threading.Lock()

    def __call__(self, prompt: str):
        request, one, two = self._SHOWN.search(prompt).groups()
        instruction = request.rsplit("Task: ", 1)[1].strip()
        roll = fake_openai._hash(one, two)
        verdict = None if roll % 6 == 0 else 1 + roll % 2
        with self._lock:
            self.seen.append((instruction, one, two, verdict))
        return (TIE if verdict is None else f"Answer {verdict} is more accurate.\nBest: {verdict}"), "stop"


def test_best_of_two_keeps_the_judged_answer_on_every_row(tmp_path, fake_server, seed_file):
    weights = {"t1": 0.5, "t2": 0.5, "judge": 0.0}
    judge = _Judge()
    servers = {"t1": fake_server(reply=_tagged("t1")), "t2": fake_server(reply=_tagged("t2")),
               "judge": fake_server(reply=judge)}
    committee = {"answer": "best_of", "k": 2, "judge": "judge", "best_of_stages": ["instances"], "seed": 5}
    config = _config(tmp_path, servers, weights, committee, seed_file, "pipeline.name=self-instruct",
                     "pipeline.num_instructions=20", "pipeline.requests_per_round=2",
                     "pipeline.num_prompt_instructions=8", "pipeline.tasks_per_request=16")
    report = generate(config)
    assert report["stop"] == "target"
    keys_by_id = _journal_keys(tmp_path)
    judge_keys = {keys_by_id[rid] for rid in servers["judge"].completed_ids()}
    prompts = {e["prompt"]: keys_by_id[e["rid"]] for e in servers["judge"].log}
    chosen = {}
    for instruction, one, two, verdict in judge.seen:
        if verdict is None:     # the seeded tie-break, over [planned teacher, the other one]
            key = next(k for p, k in prompts.items() if one in p and two in p).removesuffix("/judge")
            planned = _expected(5, key, weights)
            order = [planned, "t2" if planned == "t1" else "t1"]
            winner = order[int(hashlib.sha256(f"5/{key}/tie".encode()).hexdigest()[:16], 16) % 2]
        else:
            winner = re.search(r"Input: (t\d) ", (one, two)[verdict - 1]).group(1)
        chosen[instruction] = (winner, verdict or "unparsed")
    assert len(judge_keys) == len(judge.seen) >= 15
    assert {v for _, v in chosen.values()} >= {1, 2, "unparsed"}
    rows = json.loads((tmp_path / "out" / "data.json").read_text())
    assert rows
    for row in rows:
        winner, verdict = chosen[row["instruction"]]
        assert row["input"].startswith(winner + " ")                   # the kept answer is the judged one
        stage = row["provenance"]["instances"]
        assert (stage["teacher"], stage["verdict"], stage["judge"]) == (winner, verdict, "model-judge")
        assert sorted(stage["candidates"]) == ["model-t1", "model-t2"]
    assert report["committee"]["judge"]["unparsed"] > 0


def test_per_stage_sends_each_stage_to_its_teacher(tmp_path, fake_server, seed_file):
    weights = {"t1": 1.0, "t2": 1.0, "t3": 1.0}
    servers = {n: fake_server(reply=_tagged(n)) for n in weights}
    committee = {"assign": "per_stage", "stages": {"instructions": "t1", "classification": "t2", "instances": "t3"}}
    config = _config(tmp_path, servers, weights, committee, seed_file, "pipeline.name=self-instruct",
                     "pipeline.num_instructions=12", "pipeline.requests_per_round=2",
                     "pipeline.num_prompt_instructions=8", "pipeline.tasks_per_request=16")
    assert generate(config)["stop"] == "target"
    prompts = {n: [e["prompt"] for e in s.log] for n, s in servers.items()}
    assert prompts["t1"] and all(p.startswith("Come up with a series of") for p in prompts["t1"])
    assert prompts["t2"] and all(p.rstrip().endswith("Is it classification?") for p in prompts["t2"])
    assert prompts["t3"] and all(p.startswith(("Each task below", "Write examples")) for p in prompts["t3"])
    rows = json.loads((tmp_path / "out" / "data.json").read_text())
    assert rows and all({s: w["teacher"] for s, w in r["provenance"].items()}
                        == {"instructions": "t1", "classification": "t2", "instances": "t3"} for r in rows)


def test_a_teacher_at_its_own_cap_hands_over_and_the_total_cap_stops_the_run(tmp_path, fake_server, seed_file):
    weights = {"t1": 0.5, "t2": 0.5}
    servers = {n: fake_server(reply=_tagged(n)) for n in weights}
    config = _config(tmp_path, servers, weights, {}, seed_file, "pipeline.requests_per_round=10",
                     "pipeline.num_instructions=1000000", "dedup.enabled=false", "budget.max_requests=30")
    teachers = [dataclasses_replace(m, max_requests=5) if m.name == "t1" else m for m in config.teachers]
    report = generate(dataclasses_replace(config, teachers=tuple(teachers)))
    assert report["stop"] == "budget"
    paid = {n: len(s.completed_ids()) for n, s in servers.items()}
    assert paid == {"t1": 5, "t2": 25}
    assert "t1" in report["committee"]["dropped"] and "request budget" in report["committee"]["dropped"]["t1"]


def test_shipped_committee_and_curate_configs_load_and_document_every_key():
    from data_gen.config import load_curate_config

    configs = Path(__file__).resolve().parents[2] / "configs" / "generate"
    committee = load_config(configs / "committee.yaml")
    assert [m.name for m in committee.teachers] == ["gpt", "llama", "judge"]
    assert committee.committee.answer == "best_of" and committee.committee.judge == "judge"
    assert load_curate_config(configs / "curate.yaml").judge.model == "gpt-4o-mini"
    for name in ("committee", "curate", "alpaca", "self_instruct"):
        for line in (configs / f"{name}.yaml").read_text().splitlines():
            if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
                assert "#" in line, f"undocumented key in {name}.yaml: {line}"
