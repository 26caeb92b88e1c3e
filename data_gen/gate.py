"""The path every candidate instruction takes: heuristic filters, then ROUGE-L dedup.

Order matters for the report and for cost: cheap filters first, dedup last, and only an
instruction that passes everything joins the pool that later candidates are compared with
(keep-first, as in the reference generators). An exact-duplicate check runs even when ROUGE-L
cannot see the text (e.g. Chinese under rouge-score's ASCII tokenizer, where every pair scores 0).

Not here: the rules themselves (filters.py) and the fast ROUGE-L (dedup.py).
"""

from __future__ import annotations

from typing import Iterable

from data_gen.config import DedupConfig, FilterConfig
from data_gen.dedup import RougeDeduplicator
from data_gen.filters import instruction_drop_reason
from data_gen.report import Report

__all__ = ["InstructionGate"]


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


class InstructionGate:
    def __init__(self, filters: FilterConfig, dedup: DedupConfig, report: Report,
                 pool: Iterable[str] = ()):
        self.filters = filters
        self.config = dedup
        self.report = report
        self.dedup = RougeDeduplicator(dedup.threshold, dedup.tokenizer) if dedup.enabled else None
        self._exact: set[str] = set()
        for text in pool:
            self._remember(text)

    def _remember(self, text: str) -> None:
        self._exact.add(_normalise(text))
        if self.dedup is not None:
            self.dedup.add(text)

    def admit(self, instruction: str) -> bool:
        """Count the candidate; True (and add it to the pool) if it survives every check."""
        report = self.report
        report.candidates += 1
        report.tokenizer_coverage(instruction)
        reason = instruction_drop_reason(instruction, self.filters)
        if reason is not None:
            report.drop(reason)
            return False
        if _normalise(instruction) in self._exact:
            report.drop("exact_duplicate")
            return False
        if self.dedup is not None:
            if self.config.similarity_histogram:
                score = self.dedup.max_similarity(instruction)
                report.similarity(score)
                duplicate = score > self.config.threshold
            else:
                duplicate = self.dedup.is_near_duplicate(instruction)
            if duplicate:
                report.drop("near_duplicate")
                return False
        self._remember(instruction)
        return True
