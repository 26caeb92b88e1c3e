"""The train state pytree and its creation directly onto the mesh."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from alpaca_jax import sharding
from alpaca_jax.model.params import adapter_axes, adapter_shapes, init_params, logical_axes, param_shapes


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # optimizer steps taken (int32 scalar)
    params: Any              # model parameters (unboxed)
    opt_state: Any           # optax state


def optimizer_state_layout(optimizer: optax.GradientTransformation, opt_shapes, param_layout, other,
                           is_leaf=None):
    """Give each optimizer-state leaf the layout (sharding or spec) of the param it mirrors.

    Adam's moments mirror the params; counters and other non-param leaves get `other`.
    """
    return optax.tree_map_params(optimizer, lambda _, layout: layout, opt_shapes, param_layout,
                                 transform_non_params=lambda _: other, is_leaf=is_leaf)


def state_shardings(model_cfg, optimizer: optax.GradientTransformation, mesh, rules, lora=None):
    """NamedShardings for every leaf of the TrainState (params and Adam moments alike).

    With a LoRA config the state's params are the adapters (the frozen base lives apart).
    """
    if lora is None:
        shapes, specs = param_shapes(model_cfg), logical_axes(model_cfg)
    else:
        shapes, specs = adapter_shapes(model_cfg, lora), adapter_axes(model_cfg, lora)
    param_sh = sharding.tree_shardings(specs, shapes, mesh, rules)
    opt_sh = optimizer_state_layout(optimizer, jax.eval_shape(optimizer.init, shapes), param_sh,
                                    sharding.replicated(mesh))
    return TrainState(step=sharding.replicated(mesh), params=param_sh, opt_state=opt_sh)


def fresh_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0 around given params: a new optimizer state (call under jit with out_shardings)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def create_train_state(model_cfg, optimizer, rng, shardings: TrainState) -> TrainState:
    """Initialise params and optimizer state already sharded (never whole on one device)."""
    init = lambda key: fresh_train_state(init_params(model_cfg, key), optimizer)
    return jax.jit(init, out_shardings=shardings)(rng)
