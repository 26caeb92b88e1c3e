"""Our own seed task pool (data_gen/seed_tasks.jsonl): format, size, mix, originality."""

from __future__ import annotations

import json
import re

from alpaca_jax.data import read_records, resolve_data_path

KEYS = {"id", "name", "instruction", "instances", "is_classification"}


def _pool():
    path = resolve_data_path("builtin:seed_tasks")
    return path, [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_seed_pool_has_the_self_instruct_format():
    path, tasks = _pool()
    assert len(tasks) >= 175
    assert len({t["id"] for t in tasks}) == len({t["name"] for t in tasks}) == len(tasks)
    for t in tasks:
        assert set(t) == KEYS, t["id"]
        assert re.fullmatch(r"seed_task_\d+", t["id"]) and re.fullmatch(r"[a-z0-9_]+", t["name"])
        assert isinstance(t["is_classification"], bool) and t["instruction"].strip()
        assert len(t["instances"]) >= 1
        assert all(set(i) == {"input", "output"} and i["output"].strip() for i in t["instances"])
    assert len(read_records(path)) == sum(len(t["instances"]) for t in tasks)


def test_seed_pool_mix():
    _, tasks = _pool()
    share = sum(t["is_classification"] for t in tasks) / len(tasks)
    assert 0.18 <= share <= 0.32  # "about a quarter classification"
    empty = sum(t["instances"][0]["input"] == "" for t in tasks) / len(tasks)
    assert 0.15 <= empty <= 0.5


def test_seed_pool_is_our_own(shared_data):
    """No instruction is a copy or near-copy of the original Self-Instruct seeds."""
    from rouge_score import rouge_scorer
    original = [json.loads(l)["instruction"] for l in (shared_data / "seed_tasks.jsonl").read_text().splitlines()]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    _, tasks = _pool()
    worst = max(scorer.score(o, t["instruction"])["rougeL"].fmeasure for t in tasks for o in original)
    assert worst < 0.7


def test_no_two_seed_instructions_are_near_duplicates():
    """The generator rejects a new instruction with ROUGE-L F > 0.7 against the pool; the pool
    itself must pass that bar, pair by pair (data_gen's own scorer and dedup decisions)."""
    from data_gen.dedup import deduplicate
    from alpaca_jax.llm.rouge import lcs_length, rouge_l_fmeasure, rouge_tokenize
    _, tasks = _pool()
    instructions = [t["instruction"] for t in tasks]
    assert deduplicate(instructions, threshold=0.7).dropped == []
    tokens = [rouge_tokenize(text) for text in instructions]
    worst = max(rouge_l_fmeasure(lcs_length(a, b), len(a), len(b))
                for i, a in enumerate(tokens) for b in tokens[:i])
    assert worst <= 0.7, worst
