"""Fixtures for the eval tests: a scripted judge server, and small eval files with two runs'
answers in AlpacaEval's layout."""

from __future__ import annotations

import json

import pytest
from judge_fakes import CATEGORIES, ScriptedJudge, fake_openai


@pytest.fixture
def judge_server():
    servers = []

    def start(policy, **kwargs):
        judge = ScriptedJudge(policy)
        server = fake_openai.FakeOpenAI(reply=judge, **kwargs).start()
        servers.append(server)
        return server, judge

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def eval_files(tmp_path, monkeypatch):
    """12 user-oriented rows (3 categories, with reference outputs) and two runs' answers."""
    monkeypatch.setenv("OPENAI_API_KEY", "dummy")
    rows = [{"id": f"user_oriented_task_{i}", "motivation_app": CATEGORIES[i % 3],
             "instruction": f"Instruction number {i}: rewrite the sentence.",
             "instances": [{"input": f"input sentence {i}" if i % 2 else "", "output": f"the reference {i}"}]}
            for i in range(12)]
    data = tmp_path / "user_oriented.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = [r["instruction"] + (f"\n\n{r['instances'][0]['input']}" if r["instances"][0]["input"] else "")
                 for r in rows]

    def outputs(name: str, text: str) -> Path:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps([{"instruction": q, "output": text.format(i=i), "generator": name,
                                     "dataset": "user_oriented"} for i, q in enumerate(questions)]))
        return path

    return {"data": data, "good": outputs("good", "GOOD answer {i}, the reference {i}"),
            "plain": outputs("plain", "plain answer {i}"), "rows": rows}
