"""Parameter helpers and RMSNorm.

Every parameter is created through `param` so it carries logical axis names (a small fixed
vocabulary: vocab, embed, heads, kv_heads, head_dim, mlp, norm, layers). Mesh axis names never
appear in model code: `alpaca_jax.sharding` maps logical names to the mesh from config rules.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from alpaca_jax.model.quantize import QuantizedArray

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def param(module: nn.Module, name: str, init: Callable, shape: Sequence[int],
          axes: tuple[str, ...], dtype) -> jax.Array:
    """Declare a parameter with logical axis names (one name per dimension).

    A frozen weight stored quantized (a QLoRA base, model/quantize.py) is returned as stored:
    its codes have another shape than `shape`, which Flax's shape check would refuse.
    """
    assert len(axes) == len(shape), (name, axes, shape)
    if module.has_variable("params", name):
        stored = module.get_variable("params", name)
        if isinstance(stored, QuantizedArray):
            return stored
    return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), dtype)


def dense(x: jax.Array, kernel: jax.Array, num_in: int = 1) -> jax.Array:
    """Contract the last `num_in` dims of x with the first `num_in` of kernel: [..., *in] -> [..., *out].

    Computed as one 2-D matmul on [tokens, in] activations rather than an einsum that keeps
    batch and length apart. The result is the same, but the weight gradient of the einsum form
    contracts over two dims at once ([B, T, D] x [B, T, F] -> [D, F]), which XLA:CPU runs
    about 25% slower than the single GEMM it becomes here (benchmarks/layer_matmuls.py; the
    whole train step, BENCHMARKS.md).
    """
    batch_shape, in_shape = x.shape[:x.ndim - num_in], kernel.shape[:num_in]
    assert x.shape[x.ndim - num_in:] == in_shape, (x.shape, kernel.shape, num_in)
    out_shape = kernel.shape[num_in:]
    flat = x.reshape(math.prod(batch_shape), math.prod(in_shape))
    y = flat @ kernel.reshape(math.prod(in_shape), math.prod(out_shape))
    return y.reshape(*batch_shape, *out_shape)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as Hugging Face LLaMA computes it: statistics in fp32, cast back, then scale.

    The cast back to the input dtype before multiplying by `scale` matters for bit-level parity
    with `LlamaRMSNorm` in bf16.
    """
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(variance + eps)).astype(x.dtype)
    return scale.astype(x.dtype) * normed


class RMSNorm(nn.Module):
    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",), self.param_dtype)
        return rms_norm(x, scale, self.eps)
