"""LoRA training's two pytrees: the frozen base (cast or quantized) and the trainable adapters.

The train state's `params` are the adapters; the base is a separate jit argument that the step
reads and never returns, so it gets no gradient, no optimizer state and no donation. Both are
created directly onto the mesh from their logical axes, like full fine-tuning's parameters.

Checkpoints hold the adapters and their optimizer state only. The base is not saved: it is
rebuilt from the reference in the run's config.yaml (`model.init_from`, or the random init of
`train.seed`), and its quantized form is recomputed, because quantizing is a pure function that
takes well under the time it takes to read the weights (a 7B NF4 base: seconds on an
accelerator), while storing it would add 3.9 GB to every run and go stale if the reference
moved. Training, resume and export all build it with `frozen_base`; `plan` reads its shapes.
"""

from __future__ import annotations

import math

import jax

from alpaca_jax import sharding
from alpaca_jax.config import Config, LoraConfig, ModelConfig
from alpaca_jax.hf import load_peft_adapter, load_pretrained
from alpaca_jax.model.layers import DTYPES
from alpaca_jax.model.lora import FROZEN_MATMULS
from alpaca_jax.model.params import adapter_axes, adapter_shapes, init_adapters, init_params, logical_axes, param_shapes
from alpaca_jax.model.quantize import QuantizedArray, quantize


def _is_frozen_matmul(path) -> bool:
    names = tuple(str(getattr(k, "key", k)) for k in path)
    return names[-2:] in FROZEN_MATMULS


def base_dtype(model_cfg: ModelConfig, lora: LoraConfig):
    return DTYPES[lora.base_dtype or model_cfg.param_dtype]


def prepare_base(params, model_cfg: ModelConfig, lora: LoraConfig):
    """Full-precision params -> the frozen base: block matmuls quantized (if configured), the
    rest (embeddings, norms, output head; QLoRA keeps those unquantized too) cast to base_dtype."""
    dtype = base_dtype(model_cfg, lora)

    def one(path, w):
        if lora.quantize != "none" and _is_frozen_matmul(path):
            return quantize(w, lora.quantize, lora.block_size)
        return w.astype(dtype)
    return jax.tree_util.tree_map_with_path(one, params)


def base_shapes(model_cfg: ModelConfig, lora: LoraConfig):
    """Abstract frozen base (QuantizedArrays where quantized), without computing anything."""
    return jax.eval_shape(lambda p: prepare_base(p, model_cfg, lora), param_shapes(model_cfg))


def base_axes(model_cfg: ModelConfig, lora: LoraConfig):
    """Logical specs of the frozen base: a quantized weight's codes and scales keep its names."""
    specs, shapes = logical_axes(model_cfg), base_shapes(model_cfg, lora)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    flat_specs = jax.tree.leaves(specs, is_leaf=is_spec)
    flat_shapes, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, QuantizedArray))
    out = [QuantizedArray(codes=spec, scales=spec, format=shape.format) if isinstance(shape, QuantizedArray)
           else spec for spec, shape in zip(flat_specs, flat_shapes)]
    return jax.tree.unflatten(treedef, out)


def base_shardings(model_cfg: ModelConfig, lora: LoraConfig, mesh, rules):
    return sharding.tree_shardings(base_axes(model_cfg, lora), base_shapes(model_cfg, lora), mesh, rules)


def trainable_layout(cfg: Config):
    """(abstract shapes, logical specs) of what the optimizer updates: the model's parameters,
    or with a `lora` section only the adapters."""
    if cfg.lora is None:
        return param_shapes(cfg.model), logical_axes(cfg.model)
    return adapter_shapes(cfg.model, cfg.lora), adapter_axes(cfg.model, cfg.lora)


def frozen_base(cfg: Config, shardings):
    """The frozen base on the mesh: `model.init_from` weights, or the random init of
    `train.seed` (the very parameters a full fine-tuning run with that seed starts from)."""
    prepare = lambda p: prepare_base(p, cfg.model, cfg.lora)
    if cfg.model.init_from is None:
        return jax.jit(lambda key: prepare(init_params(cfg.model, key)), out_shardings=shardings)(
            jax.random.key(cfg.train.seed))
    mesh = jax.tree.leaves(shardings)[0].mesh
    full = sharding.tree_shardings(logical_axes(cfg.model), param_shapes(cfg.model), mesh, cfg.mesh.rules)
    return jax.jit(prepare, out_shardings=shardings, donate_argnums=0)(
        load_pretrained(cfg.model.init_from, cfg.model, full))


def initial_adapters(cfg: Config, shardings):
    """Adapters at step 0: `lora.init_from` (a PEFT directory), else A random and B zero."""
    if cfg.lora.init_from is not None:
        return load_peft_adapter(cfg.lora.init_from, cfg.model, cfg.lora, shardings)
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), 1)  # not the base's key
    return jax.jit(lambda k: init_adapters(cfg.model, cfg.lora, k), out_shardings=shardings)(key)


def count(tree) -> int:
    """Number of weights in a (possibly quantized, possibly abstract) parameter tree."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QuantizedArray))
    return sum(math.prod(x.shape) for x in leaves)
