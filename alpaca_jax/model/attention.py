"""Grouped-query self-attention with rotary embeddings, causal within each packed segment.

Einsum legend: B batch, T length (queries), S length (keys), D embed, N query heads,
K kv heads, H head dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from alpaca_jax.model.layers import param
from alpaca_jax.model.rope import apply_rope


def segment_causal_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T] segment ids -> [B, 1, T, S] bool: attend to earlier-or-same tokens of one segment.

    Padding has segment 0 and so attends only to other padding; every query sees at least
    itself, so no softmax row is empty (which would give NaNs).
    """
    length = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same_segment & causal)[:, None, :, :]


class Attention(nn.Module):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    init_std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
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
        query = jnp.einsum("BTD,DNH->BTNH", x, wq.astype(self.dtype))
        key = jnp.einsum("BSD,DKH->BSKH", x, wk.astype(self.dtype))
        value = jnp.einsum("BSD,DKH->BSKH", x, wv.astype(self.dtype))
        query = apply_rope(query, cos, sin)
        key = apply_rope(key, cos, sin)
        # Grouped-query attention: dot_product_attention accepts K < N when K divides N.
        out = jax.nn.dot_product_attention(query, key, value, mask=mask)  # [B, T, N, H]
        return jnp.einsum("BTNH,NHD->BTD", out, wo.astype(self.dtype))
