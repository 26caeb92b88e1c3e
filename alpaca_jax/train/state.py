"""The train state pytree and its creation directly onto the mesh."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from alpaca_jax import sharding
from alpaca_jax.model.params import init_params, logical_axes, param_shapes


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # optimizer steps taken (int32 scalar)
    params: Any              # model parameters (unboxed)
    opt_state: Any           # optax state


def state_shardings(model_cfg, optimizer: optax.GradientTransformation, mesh, rules):
    """NamedShardings for every leaf of the TrainState (params and Adam moments alike)."""
    shapes = param_shapes(model_cfg)
    param_sh = sharding.tree_shardings(logical_axes(model_cfg), shapes, mesh, rules)
    opt_shapes = jax.eval_shape(optimizer.init, shapes)
    # Adam's moments mirror the params; counters and other scalars are replicated.
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, opt_shapes, param_sh,
                                   transform_non_params=lambda _: sharding.replicated(mesh))
    return TrainState(step=sharding.replicated(mesh), params=param_sh, opt_state=opt_sh)


def create_train_state(model_cfg, optimizer, rng, shardings: TrainState) -> TrainState:
    """Initialise params and optimizer state already sharded (never whole on one device)."""
    def _init(key):
        params = init_params(model_cfg, key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    return jax.jit(_init, out_shardings=shardings)(rng)
