"""Creating parameters and reading their shapes and logical axes without allocating them."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.config import ModelConfig
from alpaca_jax.model.lora import COLLECTION as LORA_COLLECTION
from alpaca_jax.model.transformer import Llama


def _dummy_inputs(batch: int = 1, length: int = 8):
    ids = jnp.zeros((batch, length), jnp.int32)
    return ids, ids, jnp.ones((batch, length), jnp.int32)


def _shell(cfg: ModelConfig, lora=None) -> Llama:
    """The model `init` traces to create parameters. Its forward pass on dummy inputs only
    places the parameters, so attention runs as plain `xla` there: no kernel is chosen (and no
    "no mesh layout" fallback warned about) for a call whose output nobody reads. Attention
    owns no parameters, so the parameters are those of any implementation."""
    return Llama(dataclasses.replace(cfg, attention="xla"), lora)


def boxed_param_shapes(cfg: ModelConfig):
    """Abstract params still wrapped in `nn.LogicallyPartitioned` (shapes + axis names)."""
    return jax.eval_shape(lambda: _shell(cfg).init(jax.random.key(0), *_dummy_inputs())["params"])


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
    return nn.meta.unbox(_shell(cfg).init(rng, *_dummy_inputs())["params"])


# -- LoRA adapters: the "lora" collection beside the frozen params (model/lora.py) ------------

def _boxed_adapter_shapes(cfg: ModelConfig, lora):
    return jax.eval_shape(lambda: _shell(cfg, lora).init(jax.random.key(0), *_dummy_inputs())[LORA_COLLECTION])


def adapter_shapes(cfg: ModelConfig, lora):
    """Abstract adapters (ShapeDtypeStructs) of a model with this LoRA config."""
    return nn.meta.unbox(_boxed_adapter_shapes(cfg, lora))


def adapter_axes(cfg: ModelConfig, lora):
    """Logical PartitionSpecs of the adapters (the adapted weight's names plus `lora_rank`)."""
    return nn.get_partition_spec(_boxed_adapter_shapes(cfg, lora))


def init_adapters(cfg: ModelConfig, lora, rng: jax.Array):
    """Fresh adapters: A random, B zero. Only the "lora" collection is returned, so under jit
    the base parameters that `init` also draws are never computed."""
    return nn.meta.unbox(_shell(cfg, lora).init(rng, *_dummy_inputs())[LORA_COLLECTION])


def unscan_layers(params, num_layers: int):
    """Scanned parameters (each block's weights stacked under "layers", axis 0 = layer) -> the
    same weights in the layout of `scan_layers=False` ("layers_0", "layers_1", ...).

    Decoding uses this: a scanned decode step slices every layer's weights out of the stack on
    every step, which XLA:CPU does as a copy (about half of a 30M model's batch-1 step,
    BENCHMARKS.md, generation); unscanned, each layer reads its weights where they lie.
    Each slice keeps the stacked array's placement on the remaining dims.
    """
    stacked = params["layers"]
    leaves, treedef = jax.tree.flatten(stacked)
    unscanned = {name: value for name, value in params.items() if name != "layers"}
    for i in range(num_layers):
        unscanned[f"layers_{i}"] = jax.tree.unflatten(treedef, [leaf[i] for leaf in leaves])
    return unscanned
