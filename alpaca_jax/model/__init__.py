"""The Flax LLaMA: layers, rotary embeddings, attention, SwiGLU MLP, the decoder, presets, LoRA
adapters (lora.py) and int8/NF4 frozen weights (quantize.py)."""

from alpaca_jax.model.attention import select_attention
from alpaca_jax.model.params import (adapter_axes, adapter_shapes, count_params, init_adapters, init_params,
                                     logical_axes, param_shapes, unscan_layers)
from alpaca_jax.model.presets import model_preset, preset_names
from alpaca_jax.model.quantize import QuantizedArray, dequantize, quantize
from alpaca_jax.model.transformer import Llama

__all__ = ["Llama", "model_preset", "preset_names", "init_params", "param_shapes",
           "logical_axes", "count_params", "init_adapters", "adapter_shapes", "adapter_axes",
           "QuantizedArray", "quantize", "dequantize", "select_attention", "unscan_layers"]
