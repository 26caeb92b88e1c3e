"""The frozen base of a LoRA run: which weights are quantized or cast, its shapes and axes.

Pure functions of the configs, below both `hf/` (which loads the weights and exports a LoRA
run's base, hf/convert.py: frozen_base) and `train/` (whose step reads the base as a separate
jit argument, never returned, so it gets no gradient, no optimizer state and no donation). The
base is created directly onto the mesh from these logical axes, like full fine-tuning's parameters.

Checkpoints hold the adapters and their optimizer state only. The base is not saved: it is
rebuilt from the reference in the run's config.yaml (`model.init_from`, or the random init of
`train.seed`), and its quantized form is recomputed, because quantizing is a pure function that
takes well under the time it takes to read the weights (a 7B NF4 base: seconds on an
accelerator), while storing it would add 3.9 GB to every run and go stale if the reference
moved. Training, resume and export all build it with `hf.convert.frozen_base`; `plan` reads
its shapes from here.

Not here: loading the weights (hf/convert.py), the adapters (model/lora.py, train/adapters.py).
"""

from __future__ import annotations

import math

import jax

from alpaca_jax import sharding
from alpaca_jax.config import LoraConfig, ModelConfig
from alpaca_jax.model.layers import DTYPES
from alpaca_jax.model.lora import FROZEN_MATMULS
from alpaca_jax.model.params import logical_axes, param_shapes
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


def count(tree) -> int:
    """Number of weights in a (possibly quantized, possibly abstract) parameter tree."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QuantizedArray))
    return sum(math.prod(x.shape) for x in leaves)
