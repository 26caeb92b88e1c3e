"""ROUGE-L of generations against references, with `rouge-score` semantics.

The arithmetic is alpaca_jax/llm/rouge.py's (rouge-score bit for bit, verified by its tests against
the `rouge_score` package): the same tokenizer (lowercase ASCII letters and digits, no
stemming), LCS and F-measure. This module only averages it over an eval set.
"""

from __future__ import annotations

from alpaca_jax.llm.rouge import lcs_length, rouge_l_fmeasure, rouge_tokenize

__all__ = ["rouge_l", "mean_rouge_l"]


def rouge_l(prediction: str, reference: str) -> float:
    """`RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure`."""
    target, predicted = rouge_tokenize(reference), rouge_tokenize(prediction)
    return rouge_l_fmeasure(lcs_length(target, predicted), len(target), len(predicted))


def mean_rouge_l(predictions: list[str], references: list[str]) -> float:
    scores = [rouge_l(p, r) for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)
