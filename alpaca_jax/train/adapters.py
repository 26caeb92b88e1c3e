"""LoRA training's two pytrees: the frozen base and the trainable adapters.

The train state's `params` are the adapters; the frozen base (model/lora_base.py: which weights
are quantized or cast, their shapes and axes; hf/convert.py: `frozen_base`, the weights loaded
and prepared) is a separate jit argument of the step. The names of both are importable from here
for the loop and the planner.
"""

from __future__ import annotations

import jax

from alpaca_jax.config import Config
from alpaca_jax.hf.convert import frozen_base
from alpaca_jax.hf.peft import load_peft_adapter
from alpaca_jax.model.lora_base import base_axes, base_dtype, base_shapes, base_shardings, count, prepare_base
from alpaca_jax.model.params import adapter_axes, adapter_shapes, init_adapters, logical_axes, param_shapes

__all__ = ["trainable_layout", "initial_adapters", "frozen_base", "prepare_base", "base_axes", "base_dtype",
           "base_shapes", "base_shardings", "count"]


def trainable_layout(cfg: Config):
    """(abstract shapes, logical specs) of what the optimizer updates: the model's parameters,
    or with a `lora` section only the adapters."""
    if cfg.lora is None:
        return param_shapes(cfg.model), logical_axes(cfg.model)
    return adapter_shapes(cfg.model, cfg.lora), adapter_axes(cfg.model, cfg.lora)


def initial_adapters(cfg: Config, shardings):
    """Adapters at step 0: `lora.init_from` (a PEFT directory), else A random and B zero."""
    if cfg.lora.init_from is not None:
        return load_peft_adapter(cfg.lora.init_from, cfg.model, cfg.lora, shardings)
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), 1)  # not the base's key
    return jax.jit(lambda k: init_adapters(cfg.model, cfg.lora, k), out_shardings=shardings)(key)
