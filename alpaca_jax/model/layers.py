"""Parameter helpers and RMSNorm.

Every parameter is created through `param` so it carries logical axis names (a small fixed
vocabulary: vocab, embed, heads, kv_heads, head_dim, mlp, norm, layers). Mesh axis names never
appear in model code: `alpaca_jax.sharding` maps logical names to the mesh from config rules.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def param(module: nn.Module, name: str, init: Callable, shape: Sequence[int],
          axes: tuple[str, ...], dtype) -> jax.Array:
    """Declare a parameter with logical axis names (one name per dimension)."""
    assert len(axes) == len(shape), (name, axes, shape)
    return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), dtype)


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
