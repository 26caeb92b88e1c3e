"""The held-out evaluation split: examples the model is scored on and never trained on.

Held-out examples come from two places: whole files (`data.eval_files`) and a fraction of each
training source's examples (`data.eval_fraction`), chosen by a permutation seeded with the
run's seed (and the source's index), so the same config always holds out the same examples (and
a resumed run keeps its split). A training example identical to a held-out one (the released
Alpaca data has duplicate rows) is dropped from training too, otherwise the "unseen" example
would be trained on under another index.

Works on Alpaca rows (a `datasets.Dataset` or a list of dicts) and on conversations alike: the
key of an example is its text (instruction, input, output; or its turns), never where it came
from.

Not here: tokenizing or batching the split (tokenize.py, dataset.py), scoring it (train/evaluate.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import datasets
import numpy as np

# Mixed into the seed so the held-out choice is not correlated with epoch 0's shuffle.
_SPLIT_STREAM = 0x5E1D


@dataclasses.dataclass(frozen=True)
class HeldOutSplit:
    train: Any                     # examples to train on (same kind as the input: Dataset or list)
    eval: Any | None               # held-out examples; None when the config asks for none
    duplicates_dropped: int        # training examples dropped for being identical to a held-out one


def example_key(example) -> tuple:
    """What makes two examples the same: their text, not the file or line they came from."""
    if isinstance(example, dict):
        return example["instruction"], example["input"], example["output"]
    return example.turns  # a Conversation (turns are frozen dataclasses, so hashable)


def _select(items, indices) -> Any:
    if isinstance(items, datasets.Dataset):
        return items.select(indices)
    return [items[int(i)] for i in indices]


def _concatenate(parts: list) -> Any:
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, datasets.Dataset) for p in parts):
        return datasets.concatenate_datasets(parts)
    return [x for p in parts for x in p]


def held_out_split(items, fraction: float, seed: int, eval_items=None, *, stream: int = 0,
                   key: Callable[[Any], tuple] = example_key) -> HeldOutSplit:
    """Split `items` into train and held-out examples; every `eval_items` example is held out.

    `stream` tells sources of one run apart (their held-out choices are independent)."""
    n = len(items)
    num_held = int(round(fraction * n))
    if fraction > 0:
        num_held = min(max(num_held, 1), n - 1)  # at least one example held out, one trained on
    order = np.random.default_rng([seed, _SPLIT_STREAM, stream]).permutation(n)
    held_idx = np.sort(order[:num_held])
    train_idx = np.sort(order[num_held:])
    parts = [_select(items, held_idx)] if num_held else []
    if eval_items is not None and len(eval_items):
        parts.append(eval_items)
    if not parts:
        return HeldOutSplit(train=items, eval=None, duplicates_dropped=0)
    held = _concatenate(parts)
    held_keys = {key(x) for x in held}
    train = _select(items, train_idx)
    keep = [i for i, x in enumerate(train) if key(x) not in held_keys]
    return HeldOutSplit(train=_select(train, keep), eval=held, duplicates_dropped=len(train) - len(keep))


def split_sources(sources: Sequence, fraction: float, seed: int, eval_conversations: list) -> tuple[list, list | None, int]:
    """(training sources, held-out conversations or None, duplicates dropped) for `mixture.Source`s:
    `fraction` of each source is held out, plus every eval-file conversation."""
    held: list = []
    train_parts = []
    for index, source in enumerate(sources):
        split = held_out_split(source.conversations, fraction, seed, stream=index)
        held.extend(split.eval or [])
        train_parts.append(split.train)
    held.extend(eval_conversations)
    if not held:
        return list(sources), None, 0
    held_keys = {example_key(c) for c in held}
    train_sources, dropped = [], 0
    for source, conversations in zip(sources, train_parts):
        kept = [c for c in conversations if example_key(c) not in held_keys]
        dropped += len(conversations) - len(kept)
        train_sources.append(dataclasses.replace(source, conversations=kept))
    return train_sources, held, dropped
