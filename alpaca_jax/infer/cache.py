"""The KV cache's shape and the static shape buckets that decoding is compiled for.

Every distinct array shape costs an XLA compilation, so batch sizes, prompt lengths and cache
lengths are rounded up to a few buckets (powers of two, capped by the model's context): a new
prompt length reuses a compiled function unless it crosses into the next bucket.
"""

from __future__ import annotations

import jax.numpy as jnp

from alpaca_jax.config import ModelConfig
from alpaca_jax.model.attention import KVCache
from alpaca_jax.model.layers import DTYPES

MIN_LENGTH_BUCKET = 64   # shortest prompt/cache length compiled for (tokens; short prompts share one shape)


def bucket(n: int, cap: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum), but at most `cap` (and never below n)."""
    size = max(minimum, 1)
    while size < n:
        size *= 2
    return max(n, min(size, cap))


def length_bucket(n: int, max_len: int) -> int:
    return bucket(n, max_len, MIN_LENGTH_BUCKET)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    """An empty cache: [L, B, K, S, H] zeros in the compute dtype, for both keys and values."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.resolved_head_dim)
    dtype = DTYPES[cfg.dtype]
    return KVCache(key=jnp.zeros(shape, dtype), value=jnp.zeros(shape, dtype))
