"""Our ROUGE-L and dedup take exactly rouge-score's decisions (tokens, LCS, F, threshold).

The texts are the project's own seed pool (instructions, inputs and outputs, so lengths vary
from a few words to paragraphs) mixed with generated variants and near-duplicates, so these
tests run in any clone."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from rouge_score import rouge_scorer, tokenize

from alpaca_jax.llm.rouge import (lcs_length, min_duplicate_lcs, rouge_l_fmeasure, rouge_tokenize,
                            unicode_tokenize)
from data_gen.dedup import RougeDeduplicator, deduplicate
from data_gen.synthetic import instruction_stream, small_vocabulary_stream, word_bag_stream

EDGE_CASES = ["", "   ", "!!!", "Hello, World!", "héllo wörld", "İstanbul", "\u212a elvin", "ｆｕｌｌ width",
              "中文 text 混合", "don't stop-believing", "A\u00a0B", "x" * 50, "ﬁne ﬂow", "emoji 😀 test",
              "MiXeD CaSe 123abc", "tab\tnew\nline", "ß straße", "Ⅻ roman", "٣ arabic digit"]


SEED_POOL = Path(__file__).resolve().parents[2] / "data_gen" / "seed_tasks.jsonl"


def _bases() -> list[str]:
    """Every instruction of our seed pool, then each line of 3-30 words of its inputs and outputs."""
    tasks = [json.loads(line) for line in SEED_POOL.read_text(encoding="utf-8").splitlines()]
    texts = [t["instruction"] for t in tasks]
    for t in tasks:
        for instance in t["instances"]:
            texts += [line for line in (instance["input"] + "\n" + instance["output"]).splitlines()
                      if 3 <= len(line.split()) <= 30]
    return list(dict.fromkeys(texts))


def test_tokenizer_matches_rouge_score():
    texts = EDGE_CASES + instruction_stream(_bases(), 5000, seed=3, variant_share=0.9)
    for text in texts:
        assert rouge_tokenize(text) == tokenize.tokenize(text, None), text


def test_lcs_and_fmeasure_match_rouge_score_pairwise():
    stream = instruction_stream(_bases()[:400], 1500, seed=4, variant_share=0.9)
    tokens = [rouge_tokenize(t) for t in stream]
    rng = random.Random(0)
    pairs = [(rng.randrange(len(tokens)), rng.randrange(len(tokens))) for _ in range(6000)]
    pairs += [(i, i - 1) for i in range(401, len(tokens))]  # variants next to their neighbours
    for i, j in pairs:
        a, b = tokens[i], tokens[j]
        ref = rouge_scorer._score_lcs(a, b)
        lcs = lcs_length(a, b)
        assert rouge_l_fmeasure(lcs, len(a), len(b)) == ref.fmeasure
        need = min_duplicate_lcs(len(a), len(b), 0.7)
        assert (ref.fmeasure > 0.7) == (need is not None and lcs >= need)


def _reference_keep(texts, threshold, pool=()):
    """stanford_alpaca's loop: rouge-score's LCS per pair against every kept instruction.

    The only shortcut: a pair without a common token has LCS 0 and F = 0, which never exceeds
    a threshold >= 0 (obvious, and independent of the pruning under test)."""
    kept = [(tokenize.tokenize(t, None),) for t in pool]
    kept = [(tokens, set(tokens)) for (tokens,) in kept]
    keep = []
    for text in texts:
        tokens = tokenize.tokenize(text, None)
        vocab = set(tokens)
        duplicate = any(not vocab.isdisjoint(other_set)
                        and rouge_scorer._score_lcs(tokens, other).fmeasure > threshold
                        for other, other_set in kept)
        keep.append(not duplicate)
        if not duplicate:
            kept.append((tokens, vocab))
    return keep


@pytest.mark.parametrize("threshold,count", [(0.7, 1500), (0.5, 600)])
def test_dedup_decisions_equal_reference(threshold, count):
    bases = _bases()
    rng = random.Random(threshold)
    rng.shuffle(bases)
    # Many near-duplicates (including punctuation, case and non-ASCII variants), in one stream.
    stream = instruction_stream(bases[:300], count, seed=int(threshold * 10), variant_share=0.93)
    expected = _reference_keep(stream, threshold)
    result = deduplicate(stream, threshold)
    ours = [False] * len(stream)
    for i in result.kept:
        ours[i] = True
    assert ours == expected
    assert 0.2 * len(stream) < len(result.dropped) < 0.9 * len(stream)  # the test has teeth


@pytest.mark.parametrize("stream,threshold", [
    (lambda: small_vocabulary_stream(700, seed=1), 0.7),   # frames: pairs share most words, in order
    (lambda: word_bag_stream(400, seed=2), 0.7),           # bags: overlap far above the LCS
    (lambda: word_bag_stream(300, seed=3), 0.35),
], ids=["frames-0.7", "bags-0.7", "bags-0.35"])
def test_dedup_of_a_small_vocabulary_equals_reference(stream, threshold):
    """The corpora where overlap bounds prune least (every pair shares words): same decisions."""
    texts = stream()
    expected = _reference_keep(texts, threshold)
    result = deduplicate(texts, threshold)
    assert [i in set(result.kept) for i in range(len(texts))] == expected
    assert 0.1 * len(texts) < len(result.dropped) < 0.95 * len(texts)  # the test has teeth


def test_dedup_against_a_seed_pool_equals_reference():
    bases = _bases()
    pool, stream = bases[:175], instruction_stream(bases[:175], 600, seed=9, variant_share=0.95)[175:]
    expected = _reference_keep(stream, 0.7, pool)
    result = deduplicate(stream, 0.7, pool=pool)
    assert [i in set(result.kept) for i in range(len(stream))] == expected
    assert result.dropped


def test_max_similarity_is_exact():
    stream = instruction_stream(_bases()[:60], 250, seed=5, variant_share=0.8)
    stream += ["word " * 70 + "x", ("long " * 40 + "tail ") * 2]  # multi-word bit vectors (>64 tokens)
    dedup = RougeDeduplicator(0.7)
    for i, text in enumerate(stream):
        tokens = tokenize.tokenize(text, None)
        expected = max([rouge_scorer._score_lcs(tokens, tokenize.tokenize(p, None)).fmeasure
                        for p in stream[:i]] or [0.0])
        assert dedup.max_similarity(text) == expected, text
        assert dedup.is_near_duplicate(text) == (expected > 0.7)
        dedup.add(text)


def test_unicode_tokenizer_splits_cjk_and_folds_case():
    assert unicode_tokenize("识别 Straße ＡＢＣ") == ["识", "别", "strasse", "abc"]
    assert rouge_tokenize("识别 Straße") == ["stra", "e"]


def test_threshold_edges():
    assert deduplicate(["a b c d", "a b c d"], threshold=1.0).dropped == []   # F > 1 never holds
    assert deduplicate(["a b c d", "x y z a"], threshold=0.0).dropped == [1]  # any shared token
    with pytest.raises(ValueError):
        RougeDeduplicator(1.5)
