"""The fused (Pallas) attention kernels that honour packed rows: segment-causal GQA attention.

Two adapters from our layout ([B, T, N, H] queries, [B, S, K, H] keys/values, [B, T] segment
ids, 0 = padding) to kernels that fuse the softmax and never write the [T, S] scores:

- `pallas_flash`: the Pallas Triton flash-attention kernel for GPUs
  (`jax.experimental.pallas.ops.gpu.attention.mha`). It takes segment ids and a causal flag,
  but no GQA: keys and values are repeated to N heads first (the repeat's gradient sums the
  G copies back, so gradients stay exact).
- `splash`: TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), with a
  causal mask per head, segment ids, and native GQA (N a multiple of K); batched by vmap.

Both kernels need the length to be a multiple of their block. Rather than fall back, rows are
padded at the end with segment id -1: no real token (segment >= 0) attends to it, each pad
token sees itself (no empty softmax row), and the padding is sliced off again.

Both run on CPU in Pallas interpret mode (`interpret=True`): slow, but exact, which is how the
tests check them against `jax.nn.dot_product_attention` without a GPU or TPU. Which one a run
uses, and when it falls back, is decided in `alpaca_jax.model.attention.select_attention`.

Einsum legend: B batch, T length (queries), S length (keys), N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FLASH_BLOCK = 128   # query/key block of the Triton kernel's forward pass (its default)
SPLASH_BLOCK = 128  # splash blocks must be multiples of the TPU's 128 lanes
_PAD_SEGMENT = -1   # segment id of the length padding: matches no real segment (>= 0)


def _pad_length(x: jax.Array, multiple: int, value=0) -> jax.Array:
    """Pad axis 1 (length) up to a multiple of `multiple`."""
    extra = -x.shape[1] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def pallas_flash_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                           segment_ids: jax.Array, interpret: bool = False) -> jax.Array:
    """Segment-causal GQA attention through the Pallas Triton flash kernel: [B, T, N, H] out."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    length, num_heads, head_dim = query.shape[1], query.shape[2], query.shape[3]
    groups = num_heads // key.shape[2]
    key = jnp.repeat(key, groups, axis=2)      # [B, S, N, H]: the kernel has no GQA
    value = jnp.repeat(value, groups, axis=2)
    query, key, value = (_pad_length(x, FLASH_BLOCK) for x in (query, key, value))
    segments = _pad_length(segment_ids.astype(jnp.int32), FLASH_BLOCK, _PAD_SEGMENT)
    out = gpu_attention.mha(query, key, value, segments, sm_scale=head_dim ** -0.5, causal=True,
                            interpret=interpret)
    return out[:, :length]


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                     segment_ids: jax.Array, interpret: bool = False) -> jax.Array:
    """Segment-causal GQA attention through TPU splash attention: [B, T, N, H] out."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    length, num_heads, head_dim = query.shape[1], query.shape[2], query.shape[3]
    # Splash does not scale the scores: fold 1/sqrt(H) into the queries, as MaxText does.
    query = query * jnp.asarray(head_dim ** -0.5, query.dtype)
    query, key, value = (_pad_length(x, SPLASH_BLOCK) for x in (query, key, value))
    segments = _pad_length(segment_ids.astype(jnp.int32), SPLASH_BLOCK, _PAD_SEGMENT)
    padded = query.shape[1]
    causal = masks.MultiHeadMask([masks.CausalMask((padded, padded)) for _ in range(num_heads)])
    kernel = splash.make_splash_mha(causal, head_shards=1, q_seq_shards=1, interpret=interpret)
    heads_first = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # splash wants [heads, length, H]
    out = jax.vmap(kernel)(heads_first(query), heads_first(key), heads_first(value),
                           segment_ids=splash.SegmentIds(q=segments, kv=segments))
    return heads_first(out)[:, :length]
