"""The SwiGLU feed-forward block: down(silu(gate(x)) * up(x)).

Einsum legend: B batch, T length, D embed, F mlp (intermediate) width.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from alpaca_jax.config import LoraConfig
from alpaca_jax.model.layers import param
from alpaca_jax.model.lora import adapted_dense


class SwiGLU(nn.Module):
    intermediate_size: int
    init_std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    lora: LoraConfig | None = None  # adapters on some of gate, up, down (model/lora.py)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        embed = x.shape[-1]
        init = nn.initializers.normal(self.init_std)
        w_gate = param(self, "w_gate", init, (embed, self.intermediate_size), ("embed", "mlp"), self.param_dtype)
        w_up = param(self, "w_up", init, (embed, self.intermediate_size), ("embed", "mlp"), self.param_dtype)
        w_down = param(self, "w_down", init, (self.intermediate_size, embed), ("mlp", "embed"), self.param_dtype)
        x = x.astype(self.dtype)
        linear = lambda target, h, w, axes: adapted_dense(self, target, h, w, 1, axes, self.lora, self.dtype)
        gate = linear("gate", x, w_gate, ("embed", "mlp"))  # [B, T, F]
        up = linear("up", x, w_up, ("embed", "mlp"))
        return linear("down", jax.nn.silu(gate) * up, w_down, ("mlp", "embed"))  # [B, T, D]
