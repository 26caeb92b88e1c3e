"""The run report: what was asked, what it cost, what was kept and why the rest was dropped.

Everything except the `this_run` section is a deterministic function of the config, the seed
pool and the journal, so an interrupted-and-resumed run reports the same numbers as an
uninterrupted one. The similarity histogram counts each candidate that reached dedup by its
maximum ROUGE-L F-measure against the pool at that moment (bins of 0.1).

Not here: the counting of requests and tokens (alpaca_jax/llm/client.py, budget.py) that it summarises.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alpaca_jax.llm.rouge import rouge_tokenize

__all__ = ["Report", "write_json_atomic", "STOPS"]

_BINS = 10

# Why a run ended. Only "target" means the requested number of instructions was reached; the
# CLI turns each into its own exit code (data_gen/cli.py).
STOPS = ("target", "budget", "no_progress", "max_rounds")


@dataclass
class Report:
    pipeline: str
    kept: int = 0
    candidates: int = 0
    dropped: Counter = field(default_factory=Counter)
    unparseable_pieces: int = 0
    unusable_answers: int = 0     # well-formed replies from which no task or answer could be parsed
    similarity_histogram: list[int] = field(default_factory=lambda: [0] * _BINS)
    # rouge-score's tokenizer sees only [a-z0-9]: how much of the text it could compare.
    texts_seen: int = 0
    texts_without_ascii_tokens: int = 0
    letters_seen: int = 0
    letters_ignored: int = 0
    stop: str = "target"
    stop_reason: str = "target reached"
    extra: dict[str, Any] = field(default_factory=dict)

    def finish(self, stop: str, reason: str) -> None:
        assert stop in STOPS, stop
        self.stop, self.stop_reason = stop, reason

    def drop(self, reason: str, count: int = 1) -> None:
        if count:
            self.dropped[reason] += count

    def similarity(self, score: float) -> None:
        self.similarity_histogram[min(int(score * _BINS), _BINS - 1)] += 1

    def tokenizer_coverage(self, text: str) -> None:
        """Count the letters and digits rouge-score's ASCII tokenizer throws away."""
        letters = sum(ch.isalnum() for ch in text)
        compared = sum(len(t) for t in rouge_tokenize(text))
        self.texts_seen += 1
        self.texts_without_ascii_tokens += compared == 0
        self.letters_seen += letters
        self.letters_ignored += max(0, letters - compared)

    def to_dict(self, teacher_stats: dict[str, Any], budget: dict[str, Any],
                this_run: dict[str, Any]) -> dict[str, Any]:
        edges = [round(i / _BINS, 1) for i in range(_BINS + 1)]
        return {
            "pipeline": self.pipeline,
            "stop": self.stop,
            "stop_reason": self.stop_reason,
            "kept": self.kept,
            "candidates": self.candidates,
            "dropped": dict(sorted(self.dropped.items())),
            "unparseable_pieces": self.unparseable_pieces,
            "unusable_answers": self.unusable_answers,
            "tokens": budget,
            "similarity_histogram": {"edges": edges, "counts": self.similarity_histogram},
            "ascii_tokenizer": {
                "texts": self.texts_seen,
                "texts_with_no_comparable_token": self.texts_without_ascii_tokens,
                "letters": self.letters_seen,
                "letters_ignored": self.letters_ignored,
                "letters_ignored_fraction": round(self.letters_ignored / max(1, self.letters_seen), 4),
            },
            **self.extra,
            "requests": teacher_stats,
            "this_run": this_run,
        }


def write_json_atomic(path: Path, data: Any) -> None:
    """Write, fsync, rename: a reader (or a crash) sees the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
