"""The training batch stream: deterministic shuffling, packing, and an exactly resumable position.

Epoch e visits the examples in `permutation(seed, e)` (or a data mixture's draw for epoch e,
`mixture.MixtureOrder`, which may repeat or leave out examples); rows are planned from that order (see
`packing.plan_rows`) and cut into global batches of `batch_size` rows; a short final batch is
filled with empty rows (zero loss weight), so no example is ever dropped. The iterator's whole
state is `{"epoch", "index"}`: plans are a pure function of (lengths, seed, epoch), so
restoring that pair reproduces the remaining stream exactly.

For multi-host runs each process materialises only its own contiguous slice of every global
batch (`shard_index` of `shard_count`).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np

from alpaca_jax.data.packing import pack_rows, plan_rows


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    def __init__(self, input_ids, loss_mask, *, batch_size: int, seq_len: int, seed: int,
                 num_epochs: int, pad_id: int, packing: bool = True, pack_window: int = 64,
                 shard_index: int = 0, shard_count: int = 1,
                 epoch_order: Callable[[int], np.ndarray] | None = None):
        if batch_size % shard_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by {shard_count} processes")
        self.input_ids, self.loss_mask = input_ids, loss_mask
        self.lengths = self.example_lengths(input_ids)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.num_epochs, self.pad_id = num_epochs, pad_id
        self.packing, self.pack_window = packing, pack_window
        self.shard_index, self.shard_count = shard_index, shard_count
        self.epoch_order = epoch_order  # a data mixture's draw (mixture.MixtureOrder); else a shuffle
        self._plans: dict[int, list[list[int]]] = {}
        self.epoch, self.index = 0, 0

    @staticmethod
    def example_lengths(input_ids) -> np.ndarray:
        """Positions each unit takes in a row (an example of n tokens takes n - 1)."""
        return np.array([len(x) - 1 for x in input_ids], np.int64)

    # -- planning ---------------------------------------------------------------------------
    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            if self.epoch_order is not None:
                order = self.epoch_order(epoch)
            else:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
            self._plans[epoch] = plan_rows(self.lengths, order, self.seq_len, self.packing,
                                           self.pack_window)
        return self._plans[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        return math.ceil(len(self.epoch_rows(epoch)) / self.batch_size)

    def total_steps(self) -> int:
        return sum(self.steps_in_epoch(e) for e in range(self.num_epochs))

    def packing_efficiency(self, epoch: int = 0) -> float:
        """Fraction of row positions holding real tokens."""
        rows = self.epoch_rows(epoch)
        real = sum(int(self.lengths[i]) for row in rows for i in row)
        return real / (len(rows) * self.seq_len)

    # -- iteration and exact resume ---------------------------------------------------------
    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while self.epoch < self.num_epochs and self.index >= self.steps_in_epoch(self.epoch):
            self.epoch, self.index = self.epoch + 1, 0
        if self.epoch >= self.num_epochs:
            raise StopIteration
        rows = self.epoch_rows(self.epoch)[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        rows = rows + [[] for _ in range(self.batch_size - len(rows))]
        local = self.batch_size // self.shard_count
        rows = rows[self.shard_index * local:(self.shard_index + 1) * local]
        self.index += 1
        return self.pack(rows)

    def pack(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        """Rows of example indices -> the batch arrays (preference batches pack pairs instead)."""
        return pack_rows(rows, self.input_ids, self.loss_mask, self.seq_len, self.pad_id)
