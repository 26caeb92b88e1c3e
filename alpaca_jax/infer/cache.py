"""The KV cache's shape and the static shape buckets that decoding is compiled for.

Every distinct array shape costs an XLA compilation, so batch sizes, prompt lengths and cache
lengths are rounded up to a few buckets (powers of two, capped by the model's context; prompts
also 1.5x powers of two): a new prompt length reuses a compiled function unless it crosses into
the next bucket. Prompts start at 16 tokens (a prefill pads every prompt to its bucket, so a
coarse bucket multiplies the prefill's work for short prompts), caches at 64 positions.
"""

from __future__ import annotations

import jax.numpy as jnp

from alpaca_jax.config import ModelConfig
from alpaca_jax.model.attention import KVCache
from alpaca_jax.model.layers import DTYPES

MIN_PROMPT_BUCKET = 16   # shortest prompt length compiled for (tokens; short prompts share one shape)
MIN_CACHE_BUCKET = 64    # shortest cache length (positions; the cache then grows by doubling)


def bucket(n: int, cap: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum), but at most `cap` (and never below n)."""
    size = max(minimum, 1)
    while size < n:
        size *= 2
    return max(n, min(size, cap))


def prompt_bucket(n: int, max_len: int) -> int:
    """The padded length of a prefill whose longest prompt has n tokens: a power of two or 1.5x
    one (16, 24, 32, 48, 64, 96, ...), so padding is at most a third of the prefill's work
    rather than half, for two compiled shapes per doubling of the length."""
    size = bucket(n, max_len, MIN_PROMPT_BUCKET)
    three_quarters = size * 3 // 4
    return three_quarters if size > MIN_PROMPT_BUCKET and three_quarters >= n and size % 4 == 0 else size


def cache_bucket(n: int, max_len: int) -> int:
    """The cache length that holds positions 0..n-1. Attention reads the whole cache each step,
    so it starts small and doubles as rows grow, rather than being sized for the longest
    possible answer at the start."""
    return bucket(n, max_len, MIN_CACHE_BUCKET)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> tuple[KVCache, ...]:
    """An empty cache: per layer, [B, K, S, H] zeros in the compute dtype for keys and values.

    One buffer pair per layer rather than one [L, ...] stack: a layer then reads its own buffer
    as it lies, where slicing a layer out of a stack is a copy of it on every decode step
    (on XLA:CPU about 2 ms per layer at batch 16, more than the layer's matmuls).
    """
    shape = (batch, cfg.num_kv_heads, length, cfg.resolved_head_dim)
    dtype = DTYPES[cfg.dtype]
    return tuple(KVCache(key=jnp.zeros(shape, dtype), value=jnp.zeros(shape, dtype))
                 for _ in range(cfg.num_layers))
