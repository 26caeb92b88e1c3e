"""Scoring pairwise verdicts: win / tie / loss, win rate, bootstrap interval, consistency.

Every instruction is judged twice, once with each answer shown first, so a judge that favours a
position cancels out. Each valid judgment scores the run under test ("x") 1 for a win, 1/2 for
a tie and 0 for a loss; the win rate is the mean score over all valid judgments (ties count
half). The 95% interval resamples *instructions* (both judgments of an instruction together,
since they are not independent) with replacement: the percentile bootstrap of the same ratio.
Position consistency is the share of instructions whose two judgments name the same answer (or
both a tie): 100% for a judge blind to order, 0% for one that always picks answer A.

Not here: asking the judge (judge.py).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

__all__ = ["PairVerdicts", "summarize", "bootstrap_interval", "SCORE"]

SCORE = {"x": 1.0, "tie": 0.5, "y": 0.0}  # the run under test is x, its opponent y


@dataclasses.dataclass(frozen=True)
class PairVerdicts:
    """The two judgments of one instruction, as which side won: "x", "y", "tie", or None when
    the judge gave no verdict (unparseable reply, failed request, budget reached)."""
    index: int
    category: str | None
    x_first: str | None       # x shown as answer A
    y_first: str | None       # y shown as answer A
    x_first_reply: str | None = None   # the judge's whole replies (its reasoning), for the HTML
    y_first_reply: str | None = None   # report; never scored

    @property
    def judgments(self) -> list[str]:
        return [v for v in (self.x_first, self.y_first) if v is not None]


def _counts(pairs: list[PairVerdicts]) -> dict[str, int]:
    judged = [v for p in pairs for v in p.judgments]
    return {"wins": judged.count("x"), "ties": judged.count("tie"), "losses": judged.count("y")}


def _win_rate(counts: dict[str, int]) -> float | None:
    total = counts["wins"] + counts["ties"] + counts["losses"]
    return (counts["wins"] + counts["ties"] / 2) / total if total else None


def bootstrap_interval(scores: np.ndarray, counts: np.ndarray, samples: int, seed: int,
                       level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of sum(scores)/sum(counts) over instructions resampled with
    replacement; scores[i] is instruction i's summed score, counts[i] its judgments."""
    keep = counts > 0
    scores, counts = scores[keep], counts[keep]
    n = len(scores)
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    rates = np.empty(samples)
    for start in range(0, samples, 256):  # chunks bound the [samples, n] index matrix
        idx = rng.integers(0, n, (min(256, samples - start), n))
        rates[start:start + len(idx)] = scores[idx].sum(1) / counts[idx].sum(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(rates, [tail, 100 - tail])
    return float(low), float(high)


def summarize(pairs: list[PairVerdicts], bootstrap_samples: int = 2000, seed: int = 0) -> dict:
    """The result of one matchup (x against y) as a JSON-ready dict."""
    counts = _counts(pairs)
    scores = np.array([sum(SCORE[v] for v in p.judgments) for p in pairs], np.float64)
    judged = np.array([len(p.judgments) for p in pairs], np.float64)
    both = [p for p in pairs if p.x_first is not None and p.y_first is not None]
    interval = bootstrap_interval(scores, judged, bootstrap_samples, seed)
    by_category: dict[str, list[PairVerdicts]] = defaultdict(list)
    for p in pairs:
        if p.category is not None:
            by_category[p.category].append(p)
    return {
        **counts,
        "win_rate": _win_rate(counts),
        "win_rate_ci95": list(interval) if interval else None,
        "position_consistency": (sum(p.x_first == p.y_first for p in both) / len(both)) if both else None,
        "instructions": len(pairs),
        "judgments": int(judged.sum()),
        "no_verdict": 2 * len(pairs) - int(judged.sum()),
        "by_category": {name: {**_counts(group), "win_rate": _win_rate(_counts(group)),
                               "instructions": len(group)}
                        for name, group in sorted(by_category.items())},
    }
