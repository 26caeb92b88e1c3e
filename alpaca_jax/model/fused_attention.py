"""The fused attention kernels that honour packed rows (segment-causal GQA attention), and the
`shard_map` wrapper that runs any of them on a device mesh.

Three adapters from our layout ([B, T, N, H] queries, [B, S, K, H] keys/values, [B, T] segment
ids, 0 = padding) to kernels that fuse the softmax and never write the [T, S] scores:

- `pallas_flash`: the Pallas Triton flash-attention kernel for GPUs
  (`jax.experimental.pallas.ops.gpu.attention.mha`). It takes segment ids and a causal flag,
  but no GQA: keys and values are repeated to N heads first (the repeat's gradient sums the
  G copies back, so gradients stay exact). Its tile sizes come from `FLASH_BLOCK_SIZES`.
- `splash`: TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), with a
  causal mask per head, segment ids, and native GQA (N a multiple of K); batched by vmap.
- `cudnn`: cuDNN's fused flash attention through `jax.nn.dot_product_attention(implementation=
  "cudnn")`, NVIDIA GPUs, bf16/fp16 only, native GQA. It has no segment ids, so the packed
  rows' block-diagonal causal mask goes in as a per-row [B, 1, T, S] mask (cuDNN adds it as a
  bias). Exact; it costs reading the mask, and JAX's cuDNN backward always computes the bias
  gradient too. Whether that still beats the Pallas kernel is what the benchmark's kernel table
  says (`benchmarks/gpu.sh`).

The kernels need the length to be a multiple of their block (cuDNN: even). Rather than fall back,
rows are padded at the end with segment id -1: no real token (segment >= 0) attends to it,
each pad token sees itself (no empty softmax row), and the padding is sliced off again.

The Pallas kernels run on CPU in Pallas interpret mode (`interpret=True`): slow, but exact,
which is how the tests check them against `jax.nn.dot_product_attention` without a GPU or TPU.

On a mesh, XLA cannot partition a kernel call (it would gather q/k/v onto every device), so
`on_mesh` runs the kernel under `jax.shard_map`: each device attends over its own rows (batch
split over the data-parallel axes) and its own heads (split over the tensor axis), with whole
sequences. A row's attention needs nothing from other rows or heads, so no collective runs.
Which kernel a run uses, and when it falls back, is decided in
`alpaca_jax.model.attention.select_attention`.

Einsum legend: B batch, T length (queries), S length (keys), N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

SPLASH_BLOCK = 128  # splash blocks must be multiples of the TPU's 128 lanes
CUDNN_MULTIPLE = 8  # cuDNN's fused attention with a bias needs an even length in training
_PAD_SEGMENT = -1   # segment id of the length padding: matches no real segment (>= 0)


@dataclasses.dataclass(frozen=True)
class FlashBlocks:
    """Tiles of the Pallas Triton kernel: forward (q, k), backward dK/dV and dQ passes, warps."""
    block_q: int = 128
    block_k: int = 128
    block_q_dkv: int = 32
    block_kv_dkv: int = 32
    block_q_dq: int = 32
    block_kv_dq: int = 32
    num_warps: int | None = None  # None: the kernel's own heuristic (4 if head_dim <= 64 else 8)
    num_stages: int = 2

    @property
    def multiple(self) -> int:
        """Rows are padded to a multiple of this, so every pass's blocks divide the length."""
        return max(self.block_q, self.block_k, self.block_q_dkv, self.block_kv_dkv,
                   self.block_q_dq, self.block_kv_dq)


# (head_dim, dtype) -> tiles of the Pallas Triton kernel. These are the kernel's own defaults,
# NOT YET MEASURED: `python benchmarks/gpu.py --only blocks` sweeps candidates on a GPU and
# prints the replacement table (the sweep's result also lands in benchmarks/results/gpu.json).
# A shape missing here uses the default.
FLASH_BLOCK_SIZES: dict[tuple[int, str], FlashBlocks] = {
    (64, "bfloat16"): FlashBlocks(),
    (128, "bfloat16"): FlashBlocks(),
    (64, "float32"): FlashBlocks(),
    (128, "float32"): FlashBlocks(),
}


def flash_blocks(head_dim: int, dtype) -> FlashBlocks:
    return FLASH_BLOCK_SIZES.get((head_dim, jnp.dtype(dtype).name), FlashBlocks())


def _pad_length(x: jax.Array, multiple: int, value=0) -> jax.Array:
    """Pad axis 1 (length) up to a multiple of `multiple`."""
    extra = -x.shape[1] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def pallas_flash_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                           segment_ids: jax.Array, interpret: bool = False,
                           blocks: FlashBlocks | None = None) -> jax.Array:
    """Segment-causal GQA attention through the Pallas Triton flash kernel: [B, T, N, H] out."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    length, num_heads, head_dim = query.shape[1], query.shape[2], query.shape[3]
    blocks = blocks or flash_blocks(head_dim, query.dtype)
    groups = num_heads // key.shape[2]
    key = jnp.repeat(key, groups, axis=2)      # [B, S, N, H]: the kernel has no GQA
    value = jnp.repeat(value, groups, axis=2)
    query, key, value = (_pad_length(x, blocks.multiple) for x in (query, key, value))
    segments = _pad_length(segment_ids.astype(jnp.int32), blocks.multiple, _PAD_SEGMENT)
    tiles = gpu_attention.BlockSizes(block_q=blocks.block_q, block_k=blocks.block_k,
                                     block_q_dkv=blocks.block_q_dkv, block_kv_dkv=blocks.block_kv_dkv,
                                     block_q_dq=blocks.block_q_dq, block_kv_dq=blocks.block_kv_dq)
    out = gpu_attention.mha(query, key, value, segments, sm_scale=head_dim ** -0.5, causal=True,
                            block_sizes=tiles, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
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


def cudnn_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                    segment_ids: jax.Array, interpret: bool = False) -> jax.Array:
    """Segment-causal GQA attention through cuDNN's fused kernel, the packing as a per-row mask."""
    del interpret  # cuDNN has no interpreter: it runs on NVIDIA GPUs only
    length = query.shape[1]
    # cuDNN trains with a bias only on even lengths: pad as the Pallas kernels do.
    query, key, value = (_pad_length(x, CUDNN_MULTIPLE) for x in (query, key, value))
    segments = _pad_length(segment_ids.astype(jnp.int32), CUDNN_MULTIPLE, _PAD_SEGMENT)
    same_segment = segments[:, :, None] == segments[:, None, :]     # [B, T, S]
    # is_causal as well as the (already causal) mask: cuDNN then skips the blocks above the
    # diagonal instead of computing and masking them.
    out = jax.nn.dot_product_attention(query, key, value, mask=same_segment[:, None], is_causal=True,
                                       implementation="cudnn")
    return out[:, :length]


KERNELS: dict[str, Callable] = {"pallas_flash": pallas_flash_attention, "splash": splash_attention,
                                "cudnn": cudnn_attention}


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    """Where attention's inputs live on the device mesh: the mesh and the mesh axes that split
    the batch, the query heads and the kv heads (from the config's logical-axis rules; empty
    tuple = not split). `length` (the axes that split the length or head dim) must stay empty:
    the kernels attend over whole sequences and heads."""
    mesh: jax.sharding.Mesh
    batch: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    kv_heads: tuple[str, ...] = ()
    length: tuple[str, ...] = ()


def _spec_axes(axes: tuple[str, ...]):
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def on_mesh(kernel: Callable, layout: MeshLayout) -> Callable:
    """`kernel(q, k, v, segment_ids)` run per device under `jax.shard_map`: rows over the batch
    axes, query heads and kv heads over the same head axes. Splitting both head axes the same
    way keeps GQA groups whole: device s holds query heads [s*N/t, (s+1)*N/t) and exactly their
    kv heads [s*K/t, (s+1)*K/t), since query head n reads kv head n // (N/K)."""
    batch = _spec_axes(layout.batch)
    q_spec = P(batch, None, _spec_axes(layout.heads), None)
    kv_spec = P(batch, None, _spec_axes(layout.kv_heads), None)
    # check_vma off: a Pallas call does not declare how its outputs vary over the mesh.
    return jax.shard_map(kernel, mesh=layout.mesh, in_specs=(q_spec, kv_spec, kv_spec, P(batch, None)),
                         out_specs=q_spec, check_vma=False)
