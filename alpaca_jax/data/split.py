"""The held-out evaluation split: rows the model is scored on and never trained on.

Held-out rows come from two places: whole files (`data.eval_files`) and a fraction of the
training files' rows (`data.eval_fraction`), chosen by a permutation seeded with the run's
seed, so the same config always holds out the same rows (and a resumed run keeps its split).
A training row identical to a held-out row (same instruction, input and output: the released
Alpaca data has such duplicates) is dropped from training too, otherwise the "unseen" row
would be trained on under another index.

Not here: tokenizing or batching the split (dataset.py, packing.py), scoring it (train/evaluate.py).
"""

from __future__ import annotations

import dataclasses

import datasets
import numpy as np

# Mixed into the seed so the held-out choice is not correlated with epoch 0's shuffle.
_SPLIT_STREAM = 0x5E1D


@dataclasses.dataclass(frozen=True)
class HeldOutSplit:
    train: datasets.Dataset        # rows to train on
    eval: datasets.Dataset | None  # held-out rows; None when the config asks for none
    duplicates_dropped: int        # training rows dropped for being identical to a held-out row


def _key(row: dict) -> tuple[str, str, str]:
    return row["instruction"], row["input"], row["output"]


def held_out_split(ds: datasets.Dataset, fraction: float, seed: int,
                   eval_files_ds: datasets.Dataset | None = None) -> HeldOutSplit:
    """Split `ds` into train and held-out rows; `eval_files_ds` rows are held out whole."""
    n = len(ds)
    num_held = int(round(fraction * n))
    if fraction > 0:
        num_held = min(max(num_held, 1), n - 1)  # at least one row held out, one trained on
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    held_idx = np.sort(order[:num_held])
    train_idx = np.sort(order[num_held:])
    parts = [ds.select(held_idx)] if num_held else []
    if eval_files_ds is not None:
        parts.append(eval_files_ds)
    if not parts:
        return HeldOutSplit(train=ds, eval=None, duplicates_dropped=0)
    held = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    held_keys = {_key(row) for row in held}
    train = ds.select(train_idx)
    keep = [i for i, row in enumerate(train) if _key(row) not in held_keys]
    return HeldOutSplit(train=train.select(keep), eval=held, duplicates_dropped=len(train) - len(keep))
