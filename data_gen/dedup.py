"""Incremental ROUGE-L near-duplicate removal with rouge-score's exact decisions, fast.

Alpaca keeps a generated instruction only if its ROUGE-L F-measure against every instruction
already kept is <= 0.7. The reference computes the LCS against the whole pool for every
candidate: O(N²) pairs of O(m·n) Python work, hours at 52K. We take the same decisions with:

1. **Prefix filtering** (Chaudhuri et al. 2006; Bayardo et al. 2007). A near-duplicate pair
   needs LCS >= L* (`min_duplicate_lcs`), and the LCS is at most the number of shared tokens
   counted with multiplicity. Turn each token bag into a set of (token, occurrence) elements and
   sort every set by one global order, rare elements first: two sets sharing >= k elements
   must share one among the first |x|-k+1 of each. Only pool entries whose prefix meets the
   candidate's prefix are looked at; with rare-first order that is a handful per candidate.
2. **Exact bit-parallel LCS** on those survivors, stopping at the first duplicate.

The global order is the element frequency in the pool at the last re-index; the index is
rebuilt whenever the pool doubles (amortised O(N)), which keeps the prefixes rare as the pool
grows. Any fixed order is correct; frequency only makes it fast.

`max_similarity` is the exact maximum F-measure against the whole pool (vectorised over the
pool with numpy), for the similarity histogram in the generator's report.

Not here: tokenization and the F-measure itself (`alpaca_jax/llm/rouge.py`), reading files (`dedup_file`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from alpaca_jax.files import read_utf8
from alpaca_jax.llm.rouge import (get_tokenizer, lcs_length_with_masks, min_duplicate_lcs,
                            min_duplicate_lcs_any, rouge_l_fmeasure)

__all__ = ["RougeDeduplicator", "DedupResult", "deduplicate", "dedup_file", "read_instructions"]

# Element = (token id, occurrence number) packed into one int; occurrences beyond this are
# clipped, which only merges elements and so can only keep more pairs (still correct).
_OCC_BITS = 16
_MIN_REINDEX = 256


class RougeDeduplicator:
    """A growing pool of tokenized instructions that answers 'is this a near-duplicate?'."""

    def __init__(self, threshold: float = 0.7, tokenizer: str = "rouge"):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"ROUGE-L threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold
        self.tokenize = get_tokenizer(tokenizer)
        self._vocab: dict[str, int] = {}
        self._pool: list[list[int]] = []          # token ids per pool entry
        self._elements: list[list[int]] = []      # element ids per pool entry (unsorted)
        self._element_sets: list[frozenset] = []  # the same, for C-speed overlap counts
        self._element_count: Counter = Counter()  # live counts, for the next re-index
        self._rank: dict[int, int] = {}           # frozen global order (smaller = rarer)
        self._postings: dict[int, list[int]] = {}
        self._indexed_at = 0
        self._scan = _PoolScanner()

    def __len__(self) -> int:
        return len(self._pool)

    # -- public API -----------------------------------------------------------------------
    def add(self, text: str) -> None:
        """Put `text` in the pool unconditionally (seed tasks)."""
        self._add_ids(self._ids(self.tokenize(text), grow=True))

    def offer(self, text: str) -> bool:
        """Keep-first dedup step: add `text` and return True unless it is a near-duplicate."""
        ids = self._ids(self.tokenize(text), grow=True)
        if self._is_near_duplicate(ids):
            return False
        self._add_ids(ids)
        return True

    def is_near_duplicate(self, text: str) -> bool:
        return self._is_near_duplicate(self._ids(self.tokenize(text), grow=False))

    def max_similarity(self, text: str) -> float:
        """Exact max ROUGE-L F-measure of `text` against the pool (0.0 for an empty pool)."""
        ids = self._ids(self.tokenize(text), grow=False)
        if not ids or not self._pool:
            return 0.0
        return self._scan.max_fmeasure(ids, len(self._vocab))

    # -- internals ------------------------------------------------------------------------
    def _ids(self, tokens: list[str], grow: bool) -> list[int]:
        # Unknown tokens in a query that must not grow the vocabulary get id -1: they match
        # nothing in the pool, which is the truth.
        vocab = self._vocab
        if grow:
            return [vocab.setdefault(t, len(vocab) + 1) for t in tokens]
        return [vocab.get(t, -1) for t in tokens]

    def _add_ids(self, ids: list[int]) -> None:
        index = len(self._pool)
        elements = _elements(ids)
        self._pool.append(ids)
        self._elements.append(elements)
        self._element_sets.append(frozenset(elements))
        self._element_count.update(elements)
        self._scan.add(ids)
        if len(self._pool) >= max(_MIN_REINDEX, 2 * self._indexed_at):
            self._reindex()
        else:
            self._index(index)

    def _reindex(self) -> None:
        order = sorted(self._element_count, key=lambda e: (self._element_count[e], e))
        self._rank = {e: r for r, e in enumerate(order)}
        self._postings = {}
        self._indexed_at = len(self._pool)
        for index in range(len(self._pool)):
            self._index(index)

    def _prefix(self, elements: list[int]) -> list[int]:
        need = min_duplicate_lcs_any(len(elements), self.threshold)
        if need is None:
            return []
        # Elements never seen at the last re-index sort first (count 0), ties by id.
        rank = self._rank
        ordered = sorted(elements, key=lambda e: (rank.get(e, -1), e))
        return ordered[: len(elements) - need + 1]

    def _index(self, index: int) -> None:
        for element in self._prefix(self._elements[index]):
            self._postings.setdefault(element, []).append(index)

    def _is_near_duplicate(self, ids: list[int]) -> bool:
        m = len(ids)
        if m == 0 or not self._pool:
            return False
        elements = _elements(ids)
        seen: set[int] = set()
        postings = self._postings
        for element in self._prefix(elements):
            seen.update(postings.get(element, ()))
        if not seen:
            return False
        query = set(elements)
        masks: dict[int, int] = {}
        for i, token in enumerate(ids):
            masks[token] = masks.get(token, 0) | (1 << i)
        pool, sets, threshold = self._pool, self._element_sets, self.threshold
        for index in seen:
            other = pool[index]
            need = min_duplicate_lcs(m, len(other), threshold)
            # Shared tokens (with multiplicity) bound the LCS from above: a set intersection
            # in C rejects most prefix matches before the Python-level LCS loop runs.
            if need is None or len(query.intersection(sets[index])) < need:
                continue
            if lcs_length_with_masks(masks, m, other) >= need:
                return True
        return False


def _elements(ids: Sequence[int]) -> list[int]:
    """Bag of tokens -> set of (token, k-th occurrence): set overlap = multiset overlap."""
    seen: dict[int, int] = {}
    out = []
    cap = (1 << _OCC_BITS) - 1
    for token in ids:
        k = seen.get(token, 0)
        seen[token] = k + 1
        out.append((token << _OCC_BITS) | min(k, cap))
    return out


class _PoolScanner:
    """Exact LCS of one query against every pool entry at once: Hyyrö's bit-vector recurrence
    over numpy uint64 words (one row per pool entry, ceil(m/64) words per row).

    Entries live in length buckets (padded matrices, grown by doubling), so short entries do
    not pay for the longest one, and whole buckets are skipped when the length bound
    2·min(m,n)/(m+n) cannot beat the best score found so far.
    """

    _EDGES = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)

    def __init__(self):
        self._buckets: dict[int, list] = {}  # width -> [matrix, lengths, count, shortest]

    def _width(self, n: int) -> tuple[int, int]:
        """(width, shortest length) of the bucket that holds entries of n tokens."""
        low = 1
        for edge in self._EDGES:
            if n <= edge:
                return edge, low
            low = edge + 1
        width = 1 << (n - 1).bit_length()
        return width, width // 2 + 1

    def add(self, ids: list[int]) -> None:
        n = len(ids)
        if n == 0:
            return
        width, low = self._width(n)
        bucket = self._buckets.setdefault(
            width, [np.zeros((16, width), np.int64), np.zeros(16, np.int64), 0, low])
        matrix, lengths, count, _ = bucket
        if count == len(matrix):
            matrix = np.concatenate([matrix, np.zeros_like(matrix)])
            lengths = np.concatenate([lengths, np.zeros_like(lengths)])
        matrix[count, :n] = ids
        lengths[count] = n
        bucket[:3] = [matrix, lengths, count + 1]

    def max_fmeasure(self, ids: list[int], vocab_size: int) -> float:
        m = len(ids)
        words = (m + 63) // 64
        masks = np.zeros((words, vocab_size + 1), np.uint64)  # id 0 = padding: matches nothing
        for i, token in enumerate(ids):
            if token > 0:
                masks[i // 64, token] |= np.uint64(1 << (i % 64))
        best = 0.0
        # Nearest lengths first: they can score highest, which lets later buckets be skipped.
        for width in sorted(self._buckets, key=lambda w: abs(w - m)):
            matrix, lengths, count, low = self._buckets[width]
            nearest = min(max(m, low), width)  # F <= 2·min(m,n)/(m+n), largest at n nearest m
            if rouge_l_fmeasure(min(m, nearest), m, nearest) <= best:
                continue
            lcs = _lcs_rows(masks, m, words, matrix[:count])
            for length, value in zip(lengths[:count].tolist(), lcs.tolist()):
                score = rouge_l_fmeasure(value, m, length)
                if score > best:
                    best = score
        return best


def _lcs_rows(masks: np.ndarray, m: int, words: int, rows: np.ndarray) -> np.ndarray:
    """LCS(query, row) for every row; the query is encoded in `masks` [words, vocab]."""
    top_bits = m - 64 * (words - 1)
    top_mask = np.uint64((1 << top_bits) - 1) if top_bits < 64 else np.uint64(2**64 - 1)
    all_ones = np.uint64(2**64 - 1)
    v = [np.full(len(rows), all_ones if w < words - 1 else top_mask, np.uint64) for w in range(words)]
    for column in range(rows.shape[1]):
        ids = rows[:, column]
        carry = np.zeros(len(rows), np.uint64)
        for w in range(words):
            u = v[w] & masks[w][ids]
            total = v[w] + u
            carry_out = (total < v[w]).astype(np.uint64)
            total2 = total + carry
            carry_out |= (total2 < total).astype(np.uint64)
            v[w] = total2 | (v[w] ^ u)   # v - u == v ^ u because u is a subset of v
            carry = carry_out
        v[-1] &= top_mask
    ones = sum(np.bitwise_count(x).astype(np.int64) for x in v)
    return m - ones


@dataclass(frozen=True)
class DedupResult:
    kept: list[int]     # indices into the input, file order
    dropped: list[int]


def deduplicate(texts: Iterable[str], threshold: float = 0.7, tokenizer: str = "rouge",
                pool: Iterable[str] = ()) -> DedupResult:
    """Keep the first of near-duplicates in order; `pool` entries are kept context, not output."""
    dedup = RougeDeduplicator(threshold, tokenizer)
    for text in pool:
        dedup.add(text)
    kept, dropped = [], []
    for i, text in enumerate(texts):
        (kept if dedup.offer(text) else dropped).append(i)
    return DedupResult(kept, dropped)


def read_instructions(path: Path, field: str = "instruction") -> tuple[list, list[str]]:
    """Records and their instruction texts from JSONL (one object per line) or a JSON array.

    A record may also be a bare string (a list of instructions). Errors (ValueError) name the
    file and line.
    """
    text = read_utf8(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
        lines = [None] * len(records)  # an array's records are named by index
    else:
        records, lines = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: malformed JSON: {e.msg}") from None
                lines.append(number)
    texts = []
    for i, (record, line) in enumerate(zip(records, lines)):
        if isinstance(record, str):
            texts.append(record)
        elif isinstance(record, dict) and isinstance(record.get(field), str):
            texts.append(record[field])
        else:
            where = f"{path}:{line}" if line is not None else f"{path}: record {i}"
            raise ValueError(f"{where}: no string field '{field}'")
    return records, texts


def dedup_file(in_path: Path, out_path: Path, threshold: float = 0.7, tokenizer: str = "rouge",
               field: str = "instruction") -> DedupResult:
    """`alpaca-jax dedup`: write the kept records of `in_path` to `out_path`, same format.

    JSONL in -> JSONL out, JSON array in -> JSON array out; the output is written to a
    temporary file and renamed, so an interrupted run never leaves half a file.
    """
    records, texts = read_instructions(in_path, field)
    result = deduplicate(texts, threshold, tokenizer)
    kept = [records[i] for i in result.kept]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    if read_utf8(in_path).lstrip().startswith("["):
        body = json.dumps(kept, ensure_ascii=False, indent=2) + "\n"
    else:
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(out_path)
    return result
