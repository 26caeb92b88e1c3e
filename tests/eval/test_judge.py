"""The pairwise judge through the real `openai` client against a scripted judge server:
both orders, position bias cancelled, win rates and intervals, categories, journal replay."""

from __future__ import annotations

import json

import numpy as np
import pytest
from judge_fakes import always_a, prefers_good, write_judge_config

from alpaca_jax.eval import bootstrap_interval, evaluate, load_judge_config, parse_verdict
from alpaca_jax.eval.outputs import FIELDS


def _judged(tmp_path, eval_files, server, runs, baseline=None, name="out"):
    cfg = load_judge_config(write_judge_config(tmp_path / f"{name}.yaml", server.url))
    return evaluate([str(eval_files[r]) for r in runs], str(eval_files["data"]), tmp_path / name,
                    judge=cfg, baseline=baseline, progress=False)


def test_both_orders_are_asked_for_every_pair(tmp_path, eval_files, judge_server):
    server, judge = judge_server(always_a)
    results = _judged(tmp_path, eval_files, server, ["good", "plain"])
    assert results["baseline"] == "references"
    references = [r["instances"][0]["output"] for r in eval_files["rows"]]
    for run, text in (("good", "GOOD answer {i}, the reference {i}"), ("plain", "plain answer {i}")):
        for i, reference in enumerate(references):
            answer = text.format(i=i)
            assert judge.shown.count((answer, reference)) == 1 and judge.shown.count((reference, answer)) == 1
    assert len(server.completed_ids()) == len(set(server.completed_ids())) == 2 * 2 * 12


def test_a_judge_that_always_picks_answer_a_gives_50_percent_and_0_consistency(tmp_path, eval_files, judge_server):
    server, _ = judge_server(always_a)
    results = _judged(tmp_path, eval_files, server, ["good", "plain"])
    for run in results["runs"]:
        judged = run["judge"]
        assert judged["win_rate"] == 0.5 and judged["position_consistency"] == 0.0
        assert (judged["wins"], judged["ties"], judged["losses"]) == (12, 0, 12)
        assert judged["win_rate_ci95"] == [0.5, 0.5]  # every instruction scores exactly 1/2
        assert all(c["win_rate"] == 0.5 for c in judged["by_category"].values())


def test_a_judge_that_always_prefers_one_run_gives_100_percent(tmp_path, eval_files, judge_server):
    server, _ = judge_server(prefers_good)
    results = _judged(tmp_path, eval_files, server, ["good", "plain"], baseline=str(eval_files["plain"]))
    good, plain = results["runs"]
    assert results["baseline"] == "plain" and plain["judge"] is None
    judged = good["judge"]
    assert judged["win_rate"] == 1.0 and judged["win_rate_ci95"] == [1.0, 1.0]
    assert (judged["wins"], judged["ties"], judged["losses"]) == (24, 0, 0)
    assert judged["position_consistency"] == 1.0
    assert judged["by_category"] == {c: {"wins": 8, "ties": 0, "losses": 0, "win_rate": 1.0, "instructions": 4}
                                     for c in ("Gmail", "Grammarly", "Wikipedia")}
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| good |" in table and "100.0% [100.0, 100.0]" in table and "| plain |" in table


def test_a_run_judged_against_itself_wins_50_percent(tmp_path, eval_files, judge_server):
    for policy in (always_a, prefers_good):
        server, _ = judge_server(policy)
        results = _judged(tmp_path, eval_files, server, ["good", "good"], baseline=str(eval_files["good"]),
                          name=policy.__name__)
        assert [r["name"] for r in results["runs"]] == ["good", "good-2"]
        assert results["runs"][1]["judge"]["win_rate"] == 0.5


def test_model_outputs_have_exactly_alpaca_eval_fields(tmp_path, eval_files, judge_server):
    results = evaluate([str(eval_files["plain"])], str(eval_files["data"]), tmp_path / "o", progress=False)
    written = json.loads((tmp_path / "o" / "model_outputs" / "plain.json").read_text())
    assert len(written) == 12 and all(tuple(row) == FIELDS for row in written)
    assert written[1]["instruction"] == "Instruction number 1: rewrite the sentence.\n\ninput sentence 1"
    assert written[0]["generator"] == "plain" and written[0]["dataset"] == "user_oriented"
    assert results["runs"][0]["judge"] is None and results["baseline"] is None


def test_rouge_l_has_rouge_score_semantics(tmp_path, eval_files):
    from rouge_score import rouge_scorer

    from alpaca_jax.eval import rouge_l
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [("The cat sat on the mat.", "A cat was sitting on a mat!"), ("", "x"),
             ("Numbers 1, 2 and 3", "numbers: 3 2 1"), ("GOOD answer 4, the reference 4", "the reference 4")]
    for prediction, reference in pairs:
        assert rouge_l(prediction, reference) == scorer.score(reference, prediction)["rougeL"].fmeasure
    results = evaluate([str(eval_files["good"])], str(eval_files["data"]), tmp_path / "r", progress=False)
    expected = np.mean([scorer.score(f"the reference {i}", f"GOOD answer {i}, the reference {i}")["rougeL"].fmeasure
                        for i in range(12)])
    assert results["runs"][0]["rouge_l"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("text, verdict", [
    ("Reasoning...\nVerdict: A", "A"), ("verdict: b", "B"), ("**Verdict:** Tie", "tie"),
    ("Verdict: A\nOn reflection,\nVerdict: B", "B"), ("A is better", None), ("", None), (None, None)])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    n, p = 400, 0.6
    wins = (rng.random(n) < p).astype(float)
    low, high = bootstrap_interval(wins, np.ones(n), samples=4000, seed=1)
    mean, half = wins.mean(), 1.96 * np.sqrt(wins.mean() * (1 - wins.mean()) / n)
    assert low == pytest.approx(mean - half, abs=0.01) and high == pytest.approx(mean + half, abs=0.01)


def test_the_shipped_judge_config_and_prompt_load(tmp_path):
    from alpaca_jax.configlib import ConfigError
    from alpaca_jax.eval.config import JUDGE_CONFIG_DIR, load_prompt
    cfg = load_judge_config(JUDGE_CONFIG_DIR / "default.yaml")
    assert cfg.judge.api == "chat" and cfg.sampling.temperature == 0.0
    prompt = load_prompt(cfg.pairwise)
    assert all(p in prompt for p in ("{instruction}", "{output_a}", "{output_b}", "Verdict: tie"))
    bad = tmp_path / "bad.txt"
    bad.write_text("Which is better? {output_a} {output_b}")
    with pytest.raises(ConfigError, match=r"lacks the placeholder\(s\) \{instruction\}"):
        load_judge_config(JUDGE_CONFIG_DIR / "default.yaml", [f"pairwise.prompt={bad}"])
