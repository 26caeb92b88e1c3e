"""ROUGE-L exactly as `rouge_score` computes it, plus the pieces fast deduplication needs.

Self-Instruct and Alpaca drop a generated instruction when its ROUGE-L F-measure against any
instruction already in the pool exceeds 0.7, using `rouge_score.rouge_scorer.RougeScorer(['rougeL'])`.
Our dedup must take the *same* decisions, so this module reproduces rouge-score bit for bit:
its tokenizer (lowercase, runs of [a-z0-9], no stemming), the LCS length, and the float
expression of the F-measure. What it adds is speed: an exact bit-parallel LCS, and the smallest
LCS length that crosses the threshold for a pair of lengths, so callers can prune pairs with
cheap upper bounds and never compare floats of their own making.

Not here: the index and the incremental dedup loop (`dedup.py`).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Callable, Sequence

__all__ = ["rouge_tokenize", "unicode_tokenize", "get_tokenizer", "lcs_length",
           "rouge_l_fmeasure", "min_duplicate_lcs", "min_duplicate_lcs_any"]

# rouge_score.tokenize: lower(), replace [^a-z0-9]+ by a space, split on whitespace, keep tokens
# matching ^[a-z0-9]+$. After the substitution only [a-z0-9] and spaces remain, so the tokens
# are exactly the maximal [a-z0-9] runs of the lowercased text; findall is that, 3x faster.
_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")

# Scripts written without spaces between words: one token per character, the common choice
# for CJK ROUGE. Other scripts tokenize on runs of letters and digits (any alphabet).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3100-\u312f\u31a0-\u31bf"
_UNICODE_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def rouge_tokenize(text: str) -> list[str]:
    """rouge-score's DefaultTokenizer(use_stemmer=False): ASCII letters and digits only.

    Everything else, including every Chinese character and accented letter, is a separator,
    so non-English text often has no tokens at all (and then ROUGE-L is 0 against anything).
    """
    return _ROUGE_TOKEN.findall(text.lower())


def unicode_tokenize(text: str) -> list[str]:
    """Letters and digits of any script; each CJK character is its own token.

    NFKC folds full-width forms and compatibility characters, casefold() is lower() for all
    scripts; not rouge-score compatible, chosen by `dedup.tokenizer: unicode` for such data.
    """
    return _UNICODE_TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


def get_tokenizer(name: str) -> Callable[[str], list[str]]:
    if name == "rouge":
        return rouge_tokenize
    if name == "unicode":
        return unicode_tokenize
    raise ValueError(f"unknown tokenizer {name!r} (known: rouge, unicode)")


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison–Dix, Hyyrö 2004).

    Bit i of `v` is 1 where the LCS row value does not grow at position i of `a`; each element
    of `b` updates all positions at once with one add, so the cost is O(len(b)) big-int
    operations instead of the O(len(a)·len(b)) table rouge-score fills.
    """
    if not a or not b:
        return 0
    masks: dict = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    return lcs_length_with_masks(masks, len(a), b)


def lcs_length_with_masks(masks: dict, m: int, b: Sequence) -> int:
    """`lcs_length` with the per-token position masks of `a` precomputed (one query, many b)."""
    full = (1 << m) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return m - v.bit_count()


def rouge_l_fmeasure(lcs: int, target_len: int, prediction_len: int) -> float:
    """rouge_scorer._score_lcs's F-measure, the same float operations in the same order.

    The result is symmetric in the two lengths: 2*p is exact, and * and + commute in IEEE.
    """
    if target_len == 0 or prediction_len == 0:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


@functools.lru_cache(maxsize=1 << 16)
def min_duplicate_lcs(m: int, n: int, threshold: float) -> int | None:
    """Smallest LCS length whose F-measure for lengths (m, n) is > threshold; None if none is.

    A pair is a near-duplicate exactly when its LCS reaches this value, so every pruning bound
    (length ratio, shared-token count) is compared with an integer and float rounding cannot
    make our decisions differ from rouge-score's. The F-measure grows with the LCS in steps of
    about 2/(m+n), far above float error, so the set {L : F(L) > t} is an upper interval; the
    loop below checks that instead of assuming it.
    """
    found = None
    for lcs in range(min(m, n) + 1):
        above = rouge_l_fmeasure(lcs, m, n) > threshold
        if above and found is None:
            found = lcs
        elif not above and found is not None:
            raise AssertionError(f"ROUGE-L F not monotone in LCS at m={m} n={n} t={threshold}")
    return found


@functools.lru_cache(maxsize=1 << 12)
def min_duplicate_lcs_any(m: int, threshold: float) -> int | None:
    """The least LCS any partner of length m would need: the prefix-filter overlap bound.

    Partners much longer than m cannot qualify (F <= 2m/(m+n)), so the scan stops once the
    length bound alone falls to the threshold; a threshold of 0 needs one shared token.
    """
    if m == 0:
        return None
    if threshold < 0:
        return 0
    best = None
    n = 1
    while True:
        if n > m and rouge_l_fmeasure(m, m, n) <= threshold:
            break
        need = min_duplicate_lcs(m, n, threshold)
        if need is not None and (best is None or need < best):
            best = need
        if best == 1:
            break
        n += 1
    return best
