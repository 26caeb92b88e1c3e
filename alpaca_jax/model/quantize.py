"""Block-wise int8 and 4-bit NormalFloat (NF4) storage for frozen weights (the QLoRA base).

A weight is cut into blocks of `block_size` consecutive values along its last axis; each block
keeps its absolute maximum (the scale) and one code per value:

- int8: code = round(127 * w / absmax), a signed byte; error at most absmax / 254 per value.
- nf4:  the nearest of the 16 NormalFloat levels (Dettmers et al. 2023, QLoRA, and bitsandbytes'
  table: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero), two codes per byte; error
  at most half the widest gap between levels (0.152) times absmax.

Scales are stored in bfloat16, rounded *up* so that |w| / scale never exceeds 1: 2 bytes per 64
weights, which keeps a 7B NF4 base under 0.3x its bf16 bytes with the embeddings left in bf16
(QLoRA's double quantization would shave another 0.03 bits; not worth a second format here).

Blocks run along the last axis so the codes and scales keep the weight's rank and logical axis
names: a quantized weight shards by the same `mesh.rules` as the weight it replaces (the last
axis is divided by 2 for NF4 codes and by `block_size` for scales; the mesh check says so if
that no longer divides).

Not here: which weights are quantized (model/lora_base.py) or how a layer uses them (model/lora.py).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("int8", "nf4")
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
SCALE_DTYPE = jnp.bfloat16


@flax.struct.dataclass
class QuantizedArray:
    """A frozen weight as block codes and per-block scales; `shape` is the weight's."""
    codes: jax.Array      # int8 [..., X], or uint8 [..., X / 2] holding two NF4 codes each
    scales: jax.Array     # bf16 [..., X / block_size]: each block's absolute maximum
    format: str = flax.struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        last = self.codes.shape[-1] * (2 if self.format == "nf4" else 1)
        return (*self.codes.shape[:-1], last)

    @property
    def ndim(self) -> int:
        return self.codes.ndim


def max_error(format: str, scale: jax.Array) -> jax.Array:
    """The largest |w - dequantize(quantize(w))| a block with this stored scale can have."""
    if format == "int8":
        return scale.astype(jnp.float32) / 254
    return scale.astype(jnp.float32) * float(np.max(np.diff(NF4_LEVELS)) / 2)


def _blocks(w: jax.Array, block_size: int) -> jax.Array:
    """[..., X] -> [..., X / block_size, block_size]."""
    if w.shape[-1] % block_size:
        raise ValueError(f"last axis {w.shape[-1]} is not a multiple of the block size {block_size}")
    return w.reshape(*w.shape[:-1], w.shape[-1] // block_size, block_size)


def _scales(blocks: jax.Array) -> jax.Array:
    """Each block's absmax as bf16, rounded up (an all-zero block gets scale 1, codes 0)."""
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    absmax = jnp.where(absmax == 0, 1.0, absmax)
    scale = absmax.astype(SCALE_DTYPE)
    return jnp.where(scale.astype(jnp.float32) < absmax,
                     jnp.nextafter(scale, jnp.asarray(jnp.inf, SCALE_DTYPE)), scale)


def quantize(w: jax.Array, format: str, block_size: int) -> QuantizedArray:
    """Block-wise codes and scales of `w` (any float dtype, computed in fp32)."""
    if format not in FORMATS:
        raise ValueError(f"unknown quantization format {format!r} (known: {FORMATS})")
    blocks = _blocks(w.astype(jnp.float32), block_size)
    scales = _scales(blocks)
    unit = blocks / scales.astype(jnp.float32)[..., None]          # in [-1, 1]
    if format == "int8":
        codes = jnp.clip(jnp.round(unit * 127), -127, 127).astype(jnp.int8).reshape(w.shape)
        return QuantizedArray(codes=codes, scales=scales, format=format)
    # Nearest level: the count of midpoints below the value (levels are sorted).
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    index = jnp.searchsorted(midpoints, unit.reshape(w.shape), side="left").astype(jnp.uint8)
    pairs = index.reshape(*w.shape[:-1], w.shape[-1] // 2, 2)
    codes = pairs[..., 0] | (pairs[..., 1] << 4)                   # low nibble first
    return QuantizedArray(codes=codes, scales=scales, format=format)


def dequantize(q: QuantizedArray, dtype: Any = jnp.float32) -> jax.Array:
    """The weight the codes stand for, in `dtype` (scaled in fp32, then cast)."""
    if q.format == "int8":
        unit = q.codes.astype(jnp.float32) / 127
    else:
        index = jnp.stack([q.codes & 0xF, q.codes >> 4], axis=-1).reshape(q.shape)
        unit = jnp.asarray(NF4_LEVELS)[index.astype(jnp.int32)]
    block_size = q.shape[-1] // q.scales.shape[-1]
    blocks = _blocks(unit, block_size) * q.scales.astype(jnp.float32)[..., None]
    return blocks.reshape(q.shape).astype(dtype)


def materialize(kernel, dtype) -> jax.Array:
    """A weight in the compute dtype, whether it is stored plainly or quantized."""
    if isinstance(kernel, QuantizedArray):
        return dequantize(kernel, dtype)
    return kernel.astype(dtype)


