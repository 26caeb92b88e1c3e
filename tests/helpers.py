"""Small builders shared by the training-spine tests (tiny shapes only)."""

from __future__ import annotations

import numpy as np

from alpaca_jax.config import ModelConfig


def tiny_model(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2)
    base.update(overrides)
    return ModelConfig(**base)


def random_examples(rng: np.random.Generator, lengths, vocab: int):
    """Examples of the given token lengths with a prompt/response loss mask."""
    ids, masks = [], []
    for n in lengths:
        ids.append(rng.integers(4, vocab, n).astype(np.int32))
        mask = np.zeros(n, bool)
        mask[rng.integers(1, n - 1):] = True  # a prompt, then the response
        masks.append(mask)
    return ids, masks
