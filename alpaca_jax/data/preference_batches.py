"""Preference pairs as tokens and batches: chosen and rejected packed side by side.

Each answer is tokenized as supervised training tokenizes an example (`[BOS] text`, the text
rendered by the run's chat template, tokenized whole), but the loss mask covers the *last*
assistant turn only: DPO scores the answer to the prompt, never the earlier turns of the prompt's
history. A sequence longer than `data.max_len` keeps its start (TRL's `keep_start`); a pair
either of whose answers keeps no response token is dropped and counted.

A batch row holds whole pairs, the chosen sequence then the rejected one, as consecutive segments
(segment ids 2k-1 and 2k for the k-th pair of a row; attention never crosses a segment), so a row
is `2 * data.max_len` positions and the pair is one packing unit. Packing (`data.packing`) puts
as many pairs in a row as fit, first-fit as for SFT; without it a row holds one pair. Segment
sums of the per-token log-probs are then the sequence log-probs (train/preference_step.py), in
at most `slots` pairs per row, a static bound from the shortest pair.

With precomputed reference log-probs the batch also carries `ref_logps` [B, 2 * slots], the
reference's sequence log-probs in the same segment order. Not for reading layouts (preference.py).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from alpaca_jax.data.chat import ChatTemplate, Rendered
from alpaca_jax.data.dataset import BatchIterator
from alpaca_jax.data.packing import pack_rows
from alpaca_jax.data.preference import PreferencePair
from alpaca_jax.data.tokenize import _encode
from alpaca_jax.data.tokenizer import special_ids


@dataclasses.dataclass(frozen=True)
class PairStats:
    pairs: int          # valid pairs read
    kept: int           # pairs with a response token on both sides within max_len
    truncated: int      # sequences cut to max_len (keeping their start)
    dropped: int        # pairs whose prompt leaves one answer no response token within max_len
    tokens: int         # tokens kept, both sides
    response_tokens: int  # tokens kept that are scored (response + end-of-turn)


@dataclasses.dataclass(frozen=True)
class TokenizedPairs:
    chosen_ids: list[np.ndarray]
    chosen_mask: list[np.ndarray]
    rejected_ids: list[np.ndarray]
    rejected_mask: list[np.ndarray]
    stats: PairStats

    def __len__(self) -> int:
        return len(self.chosen_ids)


def _last_answer_only(r: Rendered) -> Rendered:
    return dataclasses.replace(r, loss_spans=r.loss_spans[-1:])


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer, template: ChatTemplate, max_len: int,
                   add_bos: bool = True) -> TokenizedPairs:
    """Pairs -> ids and last-answer masks of both sides, cut to max_len; unscorable pairs dropped."""
    bos = special_ids(tokenizer).bos if add_bos else None
    renders = [_last_answer_only(template.render(p.conversation(answer)))
               for p in pairs for answer in (p.chosen, p.rejected)]
    encoded = _encode(tokenizer, renders, bos)
    out: list[list] = [[], [], [], []]
    truncated = dropped = 0
    for i in range(len(pairs)):
        sides = [encoded[2 * i], encoded[2 * i + 1]]
        truncated += sum(len(ids) > max_len for ids, _, _ in sides)
        cut = [(ids[:max_len], mask[:max_len]) for ids, mask, _ in sides]
        if not all(mask[1:].any() for _, mask in cut):
            dropped += 1
            continue
        for k, (ids, mask) in enumerate(cut):
            out[2 * k].append(ids)
            out[2 * k + 1].append(mask)
    all_ids, all_masks = out[0] + out[2], out[1] + out[3]
    stats = PairStats(pairs=len(pairs), kept=len(out[0]), truncated=truncated, dropped=dropped,
                      tokens=sum(len(x) for x in all_ids),
                      response_tokens=sum(int(m[1:].sum()) for m in all_masks))
    return TokenizedPairs(out[0], out[1], out[2], out[3], stats)


def pair_slots(pairs: TokenizedPairs, seq_len: int, packing: bool) -> int:
    """Most pairs a row can hold: one without packing, else as many of the shortest as fit."""
    if not packing or not len(pairs):
        return 1
    shortest = min(len(c) + len(r) - 2 for c, r in zip(pairs.chosen_ids, pairs.rejected_ids))
    return max(1, seq_len // shortest)


class PairBatchIterator(BatchIterator):
    """`BatchIterator` over pairs: a pair is the packing unit, its two sequences consecutive segments.

    `reference` (optional): [N, 2] reference sequence log-probs per pair (chosen, rejected),
    placed in each batch as `ref_logps` in segment order. State and resume are BatchIterator's.
    """

    def __init__(self, pairs: TokenizedPairs, *, reference: np.ndarray | None = None, slots: int | None = None,
                 **kwargs):
        units = list(zip(pairs.chosen_ids, pairs.rejected_ids))
        masks = list(zip(pairs.chosen_mask, pairs.rejected_mask))
        super().__init__(units, masks, **kwargs)
        self.pairs, self.reference = pairs, reference
        self.slots = slots if slots is not None else pair_slots(pairs, self.seq_len, self.packing)
        # Flat example lists: pair i is examples 2i (chosen) and 2i+1 (rejected).
        self._ids = [x for unit in units for x in unit]
        self._masks = [m for unit in masks for m in unit]

    @staticmethod
    def example_lengths(input_ids) -> np.ndarray:
        return np.array([len(c) + len(r) - 2 for c, r in input_ids], np.int64)

    def pack(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        if any(len(row) > self.slots for row in rows):
            raise ValueError(f"a row holds more than {self.slots} pairs")
        batch = pack_rows([[e for i in row for e in (2 * i, 2 * i + 1)] for row in rows],
                          self._ids, self._masks, self.seq_len, self.pad_id)
        if self.reference is not None:
            ref = np.zeros((len(rows), 2 * self.slots), np.float32)
            for b, row in enumerate(rows):
                ref[b, :2 * len(row)] = self.reference[row].reshape(-1)
            batch["ref_logps"] = ref
        return batch
