"""Our parameter names <-> Hugging Face `LlamaForCausalLM` tensor names, and the layout change.

Rotary embeddings use HF's rotate-half layout (model/rope.py), so converting is renames and
reshape/transposes only, never a permutation of the head dimension. HF stores a linear layer as
`[out, in]`; ours keep the input dimensions first and split heads out (model/attention.py,
mlp.py), except the two vocabulary matrices, which are [V, D] as in HF (transformer.py):

    ours (per layer)                      HF (model.layers.{i}.)
    attention_norm/scale  [D]             input_layernorm.weight           [D]
    attention/wq          [D, N, H]       self_attn.q_proj.weight          [N*H, D]
    attention/wk, wv      [D, K, H]       self_attn.k_proj/v_proj.weight   [K*H, D]
    attention/wo          [N, H, D]       self_attn.o_proj.weight          [D, N*H]
    mlp_norm/scale        [D]             post_attention_layernorm.weight  [D]
    mlp/w_gate, w_up      [D, F]          mlp.gate_proj/up_proj.weight     [F, D]
    mlp/w_down            [F, D]          mlp.down_proj.weight             [D, F]
    ours (top level)                      HF
    embedding             [V, D]          model.embed_tokens.weight        [V, D]
    final_norm/scale      [D]             model.norm.weight                [D]
    lm_head               [V, D]          lm_head.weight                   [V, D]  (absent when tied)

With `scan_layers` the per-layer parameters are stacked under `layers/...` with a leading layer
axis; without, they live under `layers_{i}/...`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np

from alpaca_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorMap:
    ours: tuple[str, ...]   # path inside a block's params (or the top-level params)
    hf: str                 # HF name; "{i}" is the layer index
    input_dims: int | None  # a linear: how many leading dims of ours are its input; None = same layout


LAYER_TENSORS = (
    TensorMap(("attention_norm", "scale"), "model.layers.{i}.input_layernorm.weight", None),
    TensorMap(("attention", "wq"), "model.layers.{i}.self_attn.q_proj.weight", 1),
    TensorMap(("attention", "wk"), "model.layers.{i}.self_attn.k_proj.weight", 1),
    TensorMap(("attention", "wv"), "model.layers.{i}.self_attn.v_proj.weight", 1),
    TensorMap(("attention", "wo"), "model.layers.{i}.self_attn.o_proj.weight", 2),
    TensorMap(("mlp_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight", None),
    TensorMap(("mlp", "w_gate"), "model.layers.{i}.mlp.gate_proj.weight", 1),
    TensorMap(("mlp", "w_up"), "model.layers.{i}.mlp.up_proj.weight", 1),
    TensorMap(("mlp", "w_down"), "model.layers.{i}.mlp.down_proj.weight", 1),
)
EMBEDDING = TensorMap(("embedding",), "model.embed_tokens.weight", None)
FINAL_NORM = TensorMap(("final_norm", "scale"), "model.norm.weight", None)
LM_HEAD = TensorMap(("lm_head",), "lm_head.weight", None)

# Tensors some HF checkpoints carry that hold no weights (LLaMA-1 era rotary buffers).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one HF tensor lives in our params: `path` to a leaf, and `layer` into its leading
    axis when the layers are stacked (None otherwise)."""
    hf_name: str
    path: tuple[str, ...]
    layer: int | None
    input_dims: int | None


def placements(cfg: ModelConfig) -> Iterator[Placement]:
    """Every HF tensor of a model with this config, in HF's order (embeddings, layers, head)."""
    yield Placement(EMBEDDING.hf, EMBEDDING.ours, None, None)
    for i in range(cfg.num_layers):
        for t in LAYER_TENSORS:
            if cfg.scan_layers:
                yield Placement(t.hf.format(i=i), ("layers", *t.ours), i, t.input_dims)
            else:
                yield Placement(t.hf.format(i=i), (f"layers_{i}", *t.ours), None, t.input_dims)
    yield Placement(FINAL_NORM.hf, FINAL_NORM.ours, None, None)
    if not cfg.tie_embeddings:
        yield Placement(LM_HEAD.hf, LM_HEAD.ours, None, LM_HEAD.input_dims)


def to_hf(ours: np.ndarray, input_dims: int | None) -> np.ndarray:
    """One layer's tensor in our layout -> HF's ([in..., out...] -> [out, in])."""
    if input_dims is None:
        return ours
    fan_in = math.prod(ours.shape[:input_dims])
    return ours.reshape(fan_in, -1).T


def from_hf(hf: np.ndarray, input_dims: int | None, shape: tuple[int, ...]) -> np.ndarray:
    """One HF tensor -> our layout of `shape` (one layer's shape, without the stacked axis)."""
    if input_dims is None:
        return hf.reshape(shape)
    return hf.T.reshape(shape)


def hf_shape(shape: tuple[int, ...], input_dims: int | None) -> tuple[int, ...]:
    """The HF shape of a tensor of our (one-layer) `shape`."""
    if input_dims is None:
        return tuple(shape)
    return (math.prod(shape[input_dims:]), math.prod(shape[:input_dims]))


def get_path(tree, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def leaf_paths(tree, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of every leaf of a nested dict of params."""
    if not hasattr(tree, "items"):
        return [prefix]
    return [p for key, sub in tree.items() for p in leaf_paths(sub, (*prefix, key))]
