"""Grouped-query self-attention with rotary embeddings, causal within each packed segment.

Two exact implementations of the same function (`ModelConfig.attention`):
- "xla": `jax.nn.dot_product_attention` with a [B, 1, T, S] boolean segment-causal mask.
- "chunked": queries split into static blocks, each attending only to its key prefix (the keys
  after a block can never be attended to under a causal mask). Same result, about half the
  score FLOPs and memory at long lengths, no [B, 1, T, T] mask broadcast; the faster choice on
  CPU. It is plain jnp, so it also runs (and differentiates) everywhere.

Decoding uses a third path, `cached_attention`: the keys and values of earlier tokens come from
a read-only `KVCache` (slot s holding position s of its row) and the new tokens' own keys are
attended to beside them, as two blocks of one softmax. The projections and rotary embeddings are
the same code as in training; the caller writes the new keys/values into the cache (in place,
once for all layers), so no layer copies the cache.

Einsum legend: B batch, T length (queries), S length (keys), D embed, N query heads,
K kv heads, G query heads per kv head (N = K * G), H head dim, R rows of a query block
(its queries times G).
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from alpaca_jax.model.layers import dense, param
from alpaca_jax.model.rope import apply_rope

ATTENTION_IMPLEMENTATIONS = ("xla", "chunked")
QUERY_CHUNK = 128  # queries per block of the chunked attention (a multiple of the SIMD width)


def segment_causal_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T] segment ids -> [B, 1, T, S] bool: attend to earlier-or-same tokens of one segment.

    Padding has segment 0 and so attends only to other padding; every query sees at least
    itself, so no softmax row is empty (which would give NaNs).
    """
    length = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same_segment & causal)[:, None, :, :]


def chunked_causal_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                             segment_ids: jax.Array, chunk: int = QUERY_CHUNK) -> jax.Array:
    """Segment-causal attention, query block by query block: [B, T, N, H] x [B, S, K, H] x2 -> [B, T, N, H].

    Block [start, end) of queries only needs keys [0, end): later keys are in its future. Each
    block is an ordinary masked softmax over that prefix (scores and softmax in fp32, as
    `jax.nn.dot_product_attention`), so the result equals full attention with the mask from
    `segment_causal_mask`, with the upper-right key blocks never computed.
    """
    batch, length, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    groups = num_heads // num_kv_heads
    scale = head_dim ** -0.5
    # Kv heads before length, and each block's (query, group) pairs flattened into one row
    # axis R, so every matmul here, and each of its gradients, contracts a single dim: a plain
    # batched [R, H] x [H, S] (XLA:CPU is slower on dots that contract two dims at once).
    query = (query * jnp.asarray(scale, query.dtype)).reshape(batch, length, num_kv_heads, groups, head_dim)
    query = jnp.transpose(query, (0, 2, 1, 3, 4))   # [B, K, T, G, H]
    key = jnp.transpose(key, (0, 2, 1, 3))          # [B, K, S, H]
    value = jnp.transpose(value, (0, 2, 1, 3))      # [B, K, S, H]
    position = jnp.arange(length)
    outputs = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        rows = query[:, :, start:end].reshape(batch, num_kv_heads, (end - start) * groups, head_dim)
        scores = jnp.einsum("BKRH,BKSH->BKRS", rows, key[:, :, :end],
                            preferred_element_type=jnp.float32)
        allowed = ((segment_ids[:, start:end, None] == segment_ids[:, None, :end])
                   & (position[start:end, None] >= position[None, :end]))  # [B, T, S]
        allowed = jnp.repeat(allowed, groups, axis=1)  # [B, R, S]: row t*G + g is query t
        scores = jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
        out = jnp.einsum("BKRS,BKSH->BKRH", probs, value[:, :, :end])
        outputs.append(out.reshape(batch, num_kv_heads, end - start, groups, head_dim))
    out = jnp.concatenate(outputs, axis=2)           # [B, K, T, G, H]
    return jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(batch, length, num_heads, head_dim)


def attend(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array,
           implementation: str) -> jax.Array:
    """Segment-causal GQA attention by the named implementation: [B, T, N, H] out."""
    if implementation == "chunked":
        return chunked_causal_attention(query, key, value, segment_ids, QUERY_CHUNK)
    if implementation == "xla":
        # dot_product_attention accepts K < N when K divides N.
        return jax.nn.dot_product_attention(query, key, value, mask=segment_causal_mask(segment_ids))
    raise ValueError(f"unknown attention implementation {implementation!r}")


@flax.struct.dataclass
class KVCache:
    """Keys and values for decoding: [B, K, S, H] each (with a leading [L] when stacked over
    layers); kv heads before slots, so the score and value matmuls read the cache as it lies
    (no per-step transpose of the whole cache). Slot s of a row holds that row's token at
    position s (rows never share slots), so rows of different lengths need no offsets: a
    prompt right-padded to the batch's longest is exact, its padding slots are overwritten by
    generated tokens before any query reaches them."""
    key: jax.Array
    value: jax.Array


def cached_attention(query: jax.Array, key: jax.Array, value: jax.Array, cache: KVCache,
                     positions: jax.Array) -> jax.Array:
    """Attention for new tokens [B, T] at `positions` over the cache and themselves -> [B, T, N, H].

    query [B, T, N, H]; key, value [B, T, K, H] (the new tokens'); cache [B, K, S, H].

    Cache slots before a row's first new position hold its earlier tokens (prompt, then what it
    generated); later slots are stale or empty and masked. The new tokens attend causally to
    each other. Scores of both blocks share one fp32 softmax, so this equals attention over the
    concatenated keys without building that concatenation (a copy of the cache per layer).
    """
    batch, length, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    groups = num_heads // num_kv_heads
    query = (query * jnp.asarray(head_dim ** -0.5, query.dtype)).reshape(batch, length, num_kv_heads, groups, head_dim)
    cache_key, cache_value = cache.key.astype(query.dtype), cache.value.astype(query.dtype)
    old_scores = jnp.einsum("BTKGH,BKSH->BKGTS", query, cache_key, preferred_element_type=jnp.float32)
    new_scores = jnp.einsum("BTKGH,BSKH->BKGTS", query, key, preferred_element_type=jnp.float32)
    slots = jnp.arange(cache_key.shape[2])
    old_allowed = slots[None, None, :] < positions[:, :1, None]          # [B, 1, S]
    new_allowed = positions[:, None, :] <= positions[:, :, None]        # [B, T, T] causal
    lowest = jnp.finfo(jnp.float32).min
    scores = jnp.concatenate([jnp.where(old_allowed[:, None, None], old_scores, lowest),
                              jnp.where(new_allowed[:, None, None], new_scores, lowest)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    old_probs, new_probs = probs[..., :cache_key.shape[2]], probs[..., cache_key.shape[2]:]
    out = (jnp.einsum("BKGTS,BKSH->BTKGH", old_probs, cache_value)
           + jnp.einsum("BKGTS,BSKH->BTKGH", new_probs, value))
    return out.reshape(batch, length, num_heads, head_dim)


class Attention(nn.Module):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    init_std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array | None, cos: jax.Array, sin: jax.Array,
                 positions: jax.Array | None = None, cache: KVCache | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        """[B, T, D] -> ([B, T, D], new keys/values or None). Training passes segment ids and no
        cache (and gets None back); decoding passes positions and the cache to read, and gets
        this call's keys and values ([B, T, K, H] each) to write into it."""
        embed = x.shape[-1]
        init = nn.initializers.normal(self.init_std)
        wq = param(self, "wq", init, (embed, self.num_heads, self.head_dim),
                   ("embed", "heads", "head_dim"), self.param_dtype)
        wk = param(self, "wk", init, (embed, self.num_kv_heads, self.head_dim),
                   ("embed", "kv_heads", "head_dim"), self.param_dtype)
        wv = param(self, "wv", init, (embed, self.num_kv_heads, self.head_dim),
                   ("embed", "kv_heads", "head_dim"), self.param_dtype)
        wo = param(self, "wo", init, (self.num_heads, self.head_dim, embed),
                   ("heads", "head_dim", "embed"), self.param_dtype)

        x = x.astype(self.dtype)
        query = dense(x, wq.astype(self.dtype))  # [B, T, N, H]
        key = dense(x, wk.astype(self.dtype))    # [B, S, K, H]
        value = dense(x, wv.astype(self.dtype))
        query = apply_rope(query, cos, sin)
        key = apply_rope(key, cos, sin)
        if cache is None:
            out, new_kv = attend(query, key, value, segment_ids, self.implementation), None  # [B, T, N, H]
        else:
            out, new_kv = cached_attention(query, key, value, cache, positions), KVCache(key, value)
        return dense(out, wo.astype(self.dtype), num_in=2), new_kv  # [B, T, D]
