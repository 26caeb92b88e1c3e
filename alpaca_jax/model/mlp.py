"""The SwiGLU feed-forward block: down(silu(gate(x)) * up(x)).

Einsum legend: B batch, T length, D embed, F mlp (intermediate) width.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from alpaca_jax.model.layers import dense, param


class SwiGLU(nn.Module):
    intermediate_size: int
    init_std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        embed = x.shape[-1]
        init = nn.initializers.normal(self.init_std)
        w_gate = param(self, "w_gate", init, (embed, self.intermediate_size), ("embed", "mlp"), self.param_dtype)
        w_up = param(self, "w_up", init, (embed, self.intermediate_size), ("embed", "mlp"), self.param_dtype)
        w_down = param(self, "w_down", init, (self.intermediate_size, embed), ("mlp", "embed"), self.param_dtype)
        x = x.astype(self.dtype)
        gate = dense(x, w_gate.astype(self.dtype))  # [B, T, F]
        up = dense(x, w_up.astype(self.dtype))
        return dense(jax.nn.silu(gate) * up, w_down.astype(self.dtype))  # [B, T, D]
