"""Choosing the next token: greedy, temperature, top-k, top-p, with a seed per row.

Every setting is a per-row array, so one decode step can serve rows that asked for different
sampling (the server batches unrelated requests). A row's random stream depends only on its
own seed and position, never on which other rows share its batch: the same prompt and seed give
the same text alone or batched.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from alpaca_jax.configlib import ConfigError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to decode one prompt."""
    max_new_tokens: int = 256          # tokens generated at most (fewer if the context fills up)
    temperature: float = 0.0           # softmax temperature; 0 = greedy (argmax)
    top_k: int = 0                     # sample among the k most likely tokens only; 0 = no limit
    top_p: float = 1.0                 # sample among the fewest tokens holding this probability mass
    seed: int = 0                      # RNG seed; with the prompt it fixes the sampled text
    stop: tuple[str, ...] = ()         # end the text before the first of these strings

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))


def sampling_mask(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """[B, V] bool: the tokens top-k then top-p keep (always at least the most likely one).

    Top-p keeps a token when the probability mass of the tokens ranked above it is below
    `top_p` (HF's rule: the smallest set whose mass reaches top_p). Ties at the threshold stay.
    """
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]                       # [B, V] descending
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]
    ordered = jnp.where(rank < k, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # top_p = 1 keeps everything outright: fp32 cumulative sums can reach 1.0 before the tail.
    nucleus = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0) | (rank == 0)
    kept = (rank < k) & nucleus  # a prefix of the ranking
    threshold = jnp.take_along_axis(ordered, jnp.sum(kept, axis=-1, keepdims=True) - 1, axis=-1)
    return logits >= threshold


def sample_next(logits: jax.Array, seeds: jax.Array, positions: jax.Array, temperature: jax.Array,
                top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """[B, V] logits -> [B] int32 tokens. Rows with temperature 0 take the argmax.

    The key of row b is derived from (seeds[b], positions[b]): the position of the token being
    sampled from, so each step of a row draws fresh randomness, independently of other rows.
    The sampling work (a sort of the vocabulary per row for top-k/top-p) only runs when some
    row of the batch samples; an all-greedy batch pays for the argmax alone.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        truncate = jnp.any((top_k > 0) | (top_p < 1.0))
        masked = jax.lax.cond(truncate, lambda x: jnp.where(sampling_mask(x, top_k, top_p), x, -jnp.inf),
                              lambda x: x, scaled)
        keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(seeds, positions)
        sampled = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
        return jnp.where(temperature > 0, sampled, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None)
