"""Fixtures for the eval tests: a scripted judge server, and small eval files with two runs'
answers in AlpacaEval's layout."""

from __future__ import annotations

import json

import numpy as np
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


WORDS = ("river mountain poem recipe budget email planet garden bicycle contract vaccine festival "
         "museum novel climate harbor volcano galaxy orchestra ferry modern ancient urban rural").split()


def _rows(rng: np.random.Generator, n: int, tag: str) -> list[dict]:
    def words(k):
        return " ".join(rng.choice(WORDS, k))
    return [{"instruction": f"Task {tag}{i}: describe the {words(3)}.",
             "input": words(4) if i % 3 == 0 else "", "output": f"{words(int(rng.integers(3, 12)))}."}
            for i in range(n)]


@pytest.fixture(scope="session")
def held_out_run(tmp_path_factory):
    """40 training rows (a quarter held out) + an eval file of 6 rows, one of which is also
    in the training file; 6 steps with an eval every 3, micro-batched and packed; checkpoints
    at 3 and 6, keeping the latest and the best."""
    from alpaca_jax.config import load_config
    from alpaca_jax.train import train
    root = tmp_path_factory.mktemp("held_out")
    rng = np.random.default_rng(0)
    eval_rows = _rows(rng, 6, "e")
    train_rows = _rows(rng, 40, "t") + [eval_rows[2]]
    (root / "train.json").write_text(json.dumps(train_rows))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    cfg = load_config(None, [
        f"run.dir={root / 'run'}", f"data.train_files=[{root / 'train.json'}]",
        f"data.eval_files=[{root / 'eval.jsonl'}]", "data.eval_fraction=0.25", "data.max_len=192",
        "model.vocab_size=384", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
        "train.batch_size=4", "train.grad_accum=2", "train.max_steps=6", "train.eval_every=3",
        "train.log_every=100", "train.progress_bar=false", "run.tensorboard=false", "checkpoint.every=3",
        "checkpoint.keep=1", "checkpoint.keep_best=true"])
    return cfg, train(cfg)
