"""LoRA (Hu et al. 2021): a frozen weight W plus a trainable low-rank update, y = xW + s * (x A) B.

Each adapted matmul gets A [in..., r] (uniform in +-1/sqrt(fan_in), PEFT's kaiming-uniform
default) and B [r, out...] (zeros, so the model starts exactly equal to its base), with
s = alpha / r. Adapters live in their own Flax collection, "lora", beside the frozen "params":
the trainer differentiates only that collection, so gradients and optimizer state exist for
the adapters alone. Like every parameter they carry logical axis names (the weight's own names
plus `lora_rank`), so they shard by the same `mesh.rules`.

The update is computed as (x A) B rather than folded into W, which would need a full-size
weight per layer in the forward pass and a full-size gradient in the backward. Dropout (PEFT's
`lora_dropout`) applies to the adapter's input only, and only when the caller passes a
"dropout" rng (training); without one the model is deterministic, as PEFT in eval mode.

The frozen weight may be stored quantized (model/quantize.py); it is dequantized right where it
is used, inside a `jax.checkpoint`, so the backward pass recomputes it instead of keeping every
layer's dequantized copy alive.

Why not qwix (Google's JAX quantization/LoRA library): README.md, "LoRA and QLoRA".
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from alpaca_jax.config import LoraConfig
from alpaca_jax.model.layers import dense
from alpaca_jax.model.quantize import QuantizedArray, materialize

COLLECTION = "lora"          # the Flax variable collection holding the adapters
# target -> (module, weight): where each adapter target lives in a block's params.
TARGET_WEIGHTS = {"q": ("attention", "wq"), "k": ("attention", "wk"), "v": ("attention", "wv"),
                  "o": ("attention", "wo"), "gate": ("mlp", "w_gate"), "up": ("mlp", "w_up"),
                  "down": ("mlp", "w_down")}
FROZEN_MATMULS = tuple(TARGET_WEIGHTS.values())  # every block matmul: what QLoRA quantizes


def adapter_names(weight: str) -> tuple[str, str]:
    """The A and B parameter names beside a weight: wq -> wq_lora_a, wq_lora_b."""
    return f"{weight}_lora_a", f"{weight}_lora_b"


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def _dense_dequantized(x: jax.Array, kernel: QuantizedArray, num_in: int, dtype) -> jax.Array:
    return dense(x, materialize(kernel, dtype), num_in)


def frozen_dense(x: jax.Array, kernel, num_in: int, dtype) -> jax.Array:
    """x times a (possibly quantized) weight, in the compute dtype."""
    if isinstance(kernel, QuantizedArray):
        return _dense_dequantized(x, kernel, num_in, dtype)
    return dense(x, materialize(kernel, dtype), num_in)


def _adapter_param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[str, ...]):
    boxed = nn.with_logical_partitioning(init, axes)
    variable = module.variable(COLLECTION, name, lambda: boxed(module.make_rng("params"), shape, jnp.float32))
    return nn.meta.unbox(variable.value)


def _dropout(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
    if rate == 0 or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1 - rate, x.shape)
    return jnp.where(keep, x / (1 - rate), 0).astype(x.dtype)


def adapted_dense(module: nn.Module, target: str, x: jax.Array, kernel, num_in: int,
                  axes: tuple[str, ...], lora: LoraConfig | None, dtype) -> jax.Array:
    """x W, plus the LoRA update when `target` is adapted; `axes` are W's logical names."""
    y = frozen_dense(x, kernel, num_in, dtype)
    if lora is None or target not in lora.target_modules:
        return y
    shape = tuple(kernel.shape)
    in_shape, out_shape = shape[:num_in], shape[num_in:]
    bound = 1 / math.sqrt(math.prod(in_shape))
    name_a, name_b = adapter_names(TARGET_WEIGHTS[target][1])
    a = _adapter_param(module, name_a, _uniform(bound), (*in_shape, lora.rank), (*axes[:num_in], "lora_rank"))
    b = _adapter_param(module, name_b, nn.initializers.zeros, (lora.rank, *out_shape),
                       ("lora_rank", *axes[num_in:]))
    h = _dropout(module, x, lora.dropout)
    update = dense(dense(h, a.astype(dtype), num_in), b.astype(dtype))
    return y + update * jnp.asarray(lora.scale, dtype)


def _uniform(bound: float):
    """U(-bound, bound): PEFT's kaiming_uniform_(a=sqrt(5)) on A is bound = 1/sqrt(fan_in)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init
