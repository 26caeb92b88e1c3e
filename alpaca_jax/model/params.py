"""Creating parameters and reading their shapes and logical axes without allocating them."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.config import ModelConfig
from alpaca_jax.model.transformer import Llama


def _dummy_inputs(batch: int = 1, length: int = 8):
    ids = jnp.zeros((batch, length), jnp.int32)
    return ids, ids, jnp.ones((batch, length), jnp.int32)


def boxed_param_shapes(cfg: ModelConfig):
    """Abstract params still wrapped in `nn.LogicallyPartitioned` (shapes + axis names)."""
    return jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), *_dummy_inputs())["params"])


def param_shapes(cfg: ModelConfig):
    """Pytree of `jax.ShapeDtypeStruct`, computed with `eval_shape` (no memory used)."""
    return nn.meta.unbox(boxed_param_shapes(cfg))


def logical_axes(cfg: ModelConfig):
    """Pytree of `PartitionSpec`s holding logical axis names, one per parameter dimension."""
    return nn.get_partition_spec(boxed_param_shapes(cfg))


def count_params(cfg: ModelConfig) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(param_shapes(cfg))))


def init_params(cfg: ModelConfig, rng: jax.Array):
    """Real, unboxed parameters (call under jit with out_shardings to create them sharded)."""
    return nn.meta.unbox(Llama(cfg).init(rng, *_dummy_inputs())["params"])
