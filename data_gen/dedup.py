"""Incremental ROUGE-L near-duplicate removal with rouge-score's exact decisions, fast.

Alpaca keeps a generated instruction only if its ROUGE-L F-measure against every instruction
already kept is <= 0.7. The reference computes the LCS against the whole pool for every
candidate: O(N²) pairs of O(m·n) Python work, hours at 52K. We take the same decisions as a
set-similarity join (AllPairs / PPJoin: Bayardo et al. 2007, Xiao et al. 2008):

1. **The bound.** With P = L/n and R = L/m, rouge-score's F = 2PR/(P+R) = 2L/(m+n), so
   F > t needs LCS L > t(m+n)/2 (for t = 0.7: L > 0.35(m+n)); `min_duplicate_lcs` gives the
   exact integer, computed with rouge-score's own float expression. The LCS is at most the
   shared tokens counted with multiplicity: turn each token bag into a set of (token, k-th
   occurrence) elements, and that overlap is a set intersection.
2. **Prefix filtering.** Sort every element set by one global order, rare elements first: two
   sets sharing >= k elements share one among the first |x|-k+1 of each. Each pool entry is
   indexed under its prefix only; a query looks up its own prefix.
3. **Vectorised filters.** The postings of a small-vocabulary corpus (a weak teacher's: most
   instructions share most words) grow with the pool, so the candidate pairs are filtered with
   numpy, not a Python loop: the length bound, then the exact shared-element count, each over
   all candidates of a query at once. Only pairs whose count reaches the needed LCS get an
   exact bit-parallel LCS (Python big ints), and the query stops at its first duplicate.

The global order is the element frequency in the pool at the last re-index; the index is
rebuilt whenever the pool doubles (amortised O(N)), which keeps the prefixes rare as the pool
grows. Any fixed order is correct; frequency only makes it fast.

`max_similarity` is the exact maximum F-measure against the whole pool (vectorised over the
pool with numpy), for the similarity histogram in the generator's report.

Not here: tokenization and the F-measure itself (`alpaca_jax/llm/rouge.py`), reading files (`dedup_file`).
"""

from __future__ import annotations

import json
import math
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from alpaca_jax.files import read_utf8
from alpaca_jax.llm.rouge import (get_tokenizer, lcs_length_with_masks, min_duplicate_lcs,
                            min_duplicate_lcs_any, rouge_l_fmeasure)

__all__ = ["RougeDeduplicator", "DedupResult", "deduplicate", "dedup_file", "read_instructions"]

_MIN_REINDEX = 256
_NEVER = np.iinfo(np.int32).max  # "no LCS reaches the threshold" in a row of needed lengths
# A posting packs (pool entry, position in its order); a clipped position only loosens the
# positional bound. The posting key packs (element, length bucket).
_POSITION_BITS = 16
_POSITION_MASK = (1 << _POSITION_BITS) - 1
_BUCKET_BITS = 6
_NEW_KEY = 1 << 40  # sort keys of elements added since the last re-index: id - _NEW_KEY


def _length_bucket(n: int) -> int:
    """Postings are split by partner length: exact up to 8 tokens, then ~15% wide buckets
    (each query probes every bucket its length allows: fewer buckets, fewer look-ups)."""
    if n <= 32:
        return n
    return min(32 + int(math.log(n / 32) / math.log(1.15)) + 1, (1 << _BUCKET_BITS) - 1)


class _Growable:
    """An append-only numpy array (capacity doubles), read as `.view`."""

    def __init__(self, dtype):
        self._data = np.zeros(64, dtype)
        self.size = 0

    def extend(self, values) -> None:
        values = np.asarray(values, self._data.dtype)
        end = self.size + len(values)
        if end > len(self._data):
            grown = np.zeros(max(end, 2 * len(self._data)), self._data.dtype)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size:end] = values
        self.size = end

    @property
    def view(self) -> np.ndarray:
        return self._data[: self.size]


class RougeDeduplicator:
    """A growing pool of tokenized instructions that answers 'is this a near-duplicate?'."""

    def __init__(self, threshold: float = 0.7, tokenizer: str = "rouge"):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"ROUGE-L threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold
        self.tokenize = get_tokenizer(tokenizer)
        self._vocab: dict[str, int] = {}
        self._element_ids: dict[tuple[int, int], int] = {}  # (token id, occurrence) -> element id
        self._pool: list[list[int]] = []           # token ids per pool entry (for the LCS)
        self._lengths = _Growable(np.int32)        # tokens per pool entry
        self._flat = _Growable(np.int32)           # element ids of all entries, one after another
        self._starts = _Growable(np.int64)         # where each entry's elements begin in _flat
        self._element_count: list[int] = []       # pool entries holding each element (re-index)
        self._sort_key: list[int] = []            # element -> its place in the global order
        self._postings: dict[int, array] = {}      # (element, length bucket) -> packed postings
        self._indexed_at = 0
        self._longest = 0                          # longest pool entry posted
        self._needed: dict[int, np.ndarray] = {}   # m -> least duplicate LCS by partner length
        self._plans: dict[int, tuple] = {}         # m -> (longest, probe plan)
        self._in_query = np.zeros(0, bool)         # scratch: marks the query's elements
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

    def _elements(self, ids: list[int]) -> list[int]:
        """Bag of tokens -> set of (token, k-th occurrence) ids: set overlap = multiset overlap.

        Elements the pool has never held get -1 - position: distinct, and matching nothing."""
        seen: dict[int, int] = {}
        table = self._element_ids
        out = []
        for i, token in enumerate(ids):
            k = seen.get(token, 0)
            seen[token] = k + 1
            out.append(table.get((token, k), -1 - i))
        return out

    def _add_ids(self, ids: list[int]) -> None:
        index = len(self._pool)
        seen: dict[int, int] = {}
        table = self._element_ids
        elements = []
        for token in ids:
            k = seen.get(token, 0)
            seen[token] = k + 1
            element = table.setdefault((token, k), len(table))
            if element == len(self._element_count):
                self._element_count.append(0)
                self._sort_key.append(element - _NEW_KEY)
            self._element_count[element] += 1
            elements.append(element)
        self._pool.append(ids)
        self._lengths.extend([len(ids)])
        self._starts.extend([self._flat.size])
        self._flat.extend(elements)
        self._scan.add(ids)
        if len(self._pool) >= max(_MIN_REINDEX, 2 * self._indexed_at):
            self._reindex()
        else:
            self._index(index, elements)

    def _reindex(self) -> None:
        counts = np.asarray(self._element_count, np.int64)
        order = np.lexsort((np.arange(len(counts)), counts))  # rare first, ties by id
        rank = np.empty(len(counts), np.int64)
        rank[order] = np.arange(len(counts))
        self._sort_key = rank.tolist()
        self._postings = {}
        self._indexed_at = len(self._pool)
        flat, starts = self._flat.view, self._starts.view
        for index, n in enumerate(self._lengths.view.tolist()):
            start = int(starts[index])
            self._index(index, flat[start:start + n].tolist())

    def _order(self, elements: list[int]) -> list[int]:
        """`elements` in the global order: ranked at the last re-index (rare first), before
        them the elements added since (by id), before those the query's never-seen ones. The
        order stays fixed until the next re-index, which is all prefix filtering needs."""
        keys = self._sort_key
        return sorted(elements, key=lambda e: keys[e] if e >= 0 else e - _NEW_KEY)

    def _index(self, index: int, elements: list[int]) -> None:
        """Post the entry under the prefix that any partner length would need (see `_probe_plan`),
        each posting packed as (entry << 16 | position of the element in the entry's order)."""
        n = len(elements)
        need = min_duplicate_lcs_any(n, self.threshold)
        if need is None:
            return
        postings, bucket = self._postings, _length_bucket(n)
        self._longest = max(self._longest, n)
        for position, element in enumerate(self._order(elements)[: n - need + 1]):
            key = element << _BUCKET_BITS | bucket
            entries = postings.get(key)
            if entries is None:
                postings[key] = entries = array("q")
            entries.append(index << _POSITION_BITS | min(position, _POSITION_MASK))

    def _need_row(self, m: int) -> np.ndarray:
        """Least duplicate LCS for query length m against each partner length 0..longest."""
        row = self._needed.get(m)
        if row is None or len(row) <= self._longest:
            size = max(self._longest + 1, 2 * len(row) if row is not None else 64)
            row = np.array([_NEVER] + [min_duplicate_lcs(m, n, self.threshold) or _NEVER
                                      for n in range(1, size)], np.int64)
            self._needed[m] = row
        return row

    def _probe_plan(self, m: int, row: np.ndarray) -> list[tuple[int, int]]:
        """[(length bucket, probe prefix length)] for a query of m tokens.

        Prefix filtering holds for each partner length n with the pair's own bound: the
        query needs only its first m - need(m, n) + 1 elements against partners of length n
        (the partner posted a prefix at least that long). need grows with n, so a query
        probes long partners with a short prefix; per bucket, the least need in it counts."""
        longest, plan = self._plans.get(m, (None, None))
        if longest != self._longest:
            feasible = np.flatnonzero(row[: self._longest + 1] != _NEVER)
            least: dict[int, int] = {}
            for n in feasible.tolist():
                bucket = _length_bucket(n)
                least[bucket] = min(least.get(bucket, _NEVER), int(row[n]))
            plan = [(bucket, m - need + 1) for bucket, need in sorted(least.items())]
            self._plans[m] = (self._longest, plan)
        return plan

    def _is_near_duplicate(self, ids: list[int]) -> bool:
        m = len(ids)
        if m == 0 or not self._pool:
            return False
        elements = self._elements(ids)
        ordered = self._order(elements)
        row = self._need_row(m)
        postings = self._postings
        found, sizes, positions = array("q"), [], []
        for bucket, prefix in self._probe_plan(m, row):
            for position in range(prefix):
                entries = postings.get(ordered[position] << _BUCKET_BITS | bucket)
                if entries:
                    found.extend(entries)  # a memcpy
                    sizes.append(len(entries))
                    positions.append(position)
        if not sizes:
            return False
        # Positional filter (PPJoin, Xiao et al. 2008). Every element the pair shares before a
        # hit at position i of the query's order and j of the partner's lies in both probed
        # prefixes, so it is a hit too: overlap <= hits(pair) + min(m - i - 1, n - j - 1). The
        # bound shrinks hit by hit; a pair is dropped when any of its hits falls below the need.
        packed = np.frombuffer(found, np.int64)
        entry = packed >> _POSITION_BITS
        lengths = self._lengths.view[entry]
        after = np.minimum(m - 1 - np.repeat(np.asarray(positions, np.int64), sizes),
                           lengths - 1 - (packed & _POSITION_MASK))
        del packed  # the view must not outlive `found`
        # Group the hits by pair: the postings are ascending runs, which a stable sort merges.
        order = np.argsort(entry, kind="stable")
        entry, after, need = entry[order], after[order], row[lengths[order]]
        starts = np.flatnonzero(np.concatenate(([True], entry[1:] != entry[:-1])))
        hits = np.diff(np.append(starts, len(entry)))
        hopeless = np.logical_or.reduceat(np.repeat(hits, hits) + after < need, starts)
        candidates = entry[starts][~hopeless]  # pairs whose every hit can still reach the need
        if not len(candidates):
            return False
        lengths = self._lengths.view[candidates]
        shared = self._shared_elements(elements, candidates, lengths)
        survivors = candidates[shared >= row[lengths]].tolist()
        if not survivors:
            return False
        masks: dict[int, int] = {}
        for i, token in enumerate(ids):
            masks[token] = masks.get(token, 0) | (1 << i)
        pool, threshold = self._pool, self.threshold
        for index in survivors:
            other = pool[index]
            if lcs_length_with_masks(masks, m, other) >= min_duplicate_lcs(m, len(other), threshold):
                return True
        return False

    def _shared_elements(self, elements: list[int], candidates: np.ndarray,
                         lengths: np.ndarray) -> np.ndarray:
        """Elements each candidate shares with the query (= shared tokens with multiplicity)."""
        known = np.asarray([e for e in elements if e >= 0], np.int64)
        if len(self._in_query) < len(self._element_ids):
            self._in_query = np.zeros(2 * len(self._element_ids), bool)
        mark = self._in_query
        mark[known] = True
        # Gather every candidate's run of elements from the flat array in one index vector.
        ends = np.cumsum(lengths)
        offsets = np.repeat(self._starts.view[candidates] - (ends - lengths), lengths)
        hits = mark[self._flat.view[offsets + np.arange(int(ends[-1]))]]
        mark[known] = False
        return np.add.reduceat(hits, ends - lengths, dtype=np.int64)


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
