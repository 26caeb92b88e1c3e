"""The Flax LLaMA: layers, rotary embeddings, attention, SwiGLU MLP, the decoder, presets."""

from alpaca_jax.model.attention import select_attention
from alpaca_jax.model.params import count_params, init_params, logical_axes, param_shapes
from alpaca_jax.model.presets import model_preset, preset_names
from alpaca_jax.model.transformer import Llama

__all__ = ["Llama", "model_preset", "preset_names", "init_params", "param_shapes",
           "logical_axes", "count_params", "select_attention"]
