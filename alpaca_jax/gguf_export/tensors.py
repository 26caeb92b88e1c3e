"""One tensor, Hugging Face layout -> what llama.cpp reads: its name, row order and encoding.

- Names come from gguf-py's own table for the LLaMA architecture (`model.layers.3.self_attn.q_proj`
  -> `blk.3.attn_q`), not retyped here, so they follow llama.cpp.
- Row order: llama.cpp rotates LLaMA's queries and keys in the original (GPT-J) interleaved
  layout, pairs (2i, 2i+1) of each head, while HF and we rotate halves, pairs (i, i + H/2)
  (model/rope.py). Reordering the output rows of q_proj and k_proj (and of a LoRA B beside them)
  within each head moves every pair next to each other; the dot products q.k, and so attention,
  are unchanged. llama.cpp's own converter does the same reordering.
- Encoding: f32, f16, bf16, or the block formats q8_0 (32 weights: one f16 scale + 32 int8)
  and q4_0 (32 weights: one f16 scale + 32 4-bit), quantized by gguf-py's reference code.
  Norm vectors (and the rotary factors) stay f32, as llama.cpp's converter keeps every 1-D
  tensor; a matrix whose rows are not a multiple of the block falls back to f16, again as it does.
"""

from __future__ import annotations

import dataclasses
import logging

import gguf
import numpy as np

from alpaca_jax.config import ModelConfig
from alpaca_jax.model.rope import rope_inverse_frequencies

log = logging.getLogger("alpaca_jax")

Q = gguf.GGMLQuantizationType


@dataclasses.dataclass(frozen=True)
class GgufType:
    """A `--type`: the encoding of the 2-D weights and the file type llama.cpp reports."""
    name: str
    matrices: gguf.GGMLQuantizationType
    file_type: gguf.LlamaFileType


TYPES = {t.name: t for t in (
    GgufType("f32", Q.F32, gguf.LlamaFileType.ALL_F32),
    GgufType("f16", Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    GgufType("bf16", Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    GgufType("q8_0", Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    GgufType("q4_0", Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
)}
ROTARY_PROJECTIONS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight")
ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"


def gguf_name(hf_name: str, num_layers: int) -> str:
    """llama.cpp's name of a HF LLaMA tensor (`model.norm.weight` -> `output_norm.weight`)."""
    name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, num_layers).get_name(hf_name, try_suffixes=(".weight",))
    if name is None:
        raise AssertionError(f"gguf-py has no LLaMA name for {hf_name}")
    return name  # the suffix it matched (".weight") is kept


def interleave_rotary_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """[heads * H, ...] rows in rotate-half order -> each head's rows in interleaved-pair order:
    row i and row i + H/2 of a head become rows 2i and 2i + 1."""
    per_head = rows.shape[0] // heads
    split = rows.reshape(heads, 2, per_head // 2, *rows.shape[1:])  # [heads, half, H/2, ...]
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(rows.shape))


def rotary_heads(hf_name: str, cfg: ModelConfig) -> int | None:
    """How many heads a tensor's output rows hold, if llama.cpp rotates them (q: N, k: K)."""
    if hf_name.endswith(ROTARY_PROJECTIONS[0]):
        return cfg.num_heads
    if hf_name.endswith(ROTARY_PROJECTIONS[1]):
        return cfg.num_kv_heads
    return None


def to_llama_cpp_rows(hf_name: str, rows: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """A HF weight (or a LoRA B, whose rows are the weight's output rows) in llama.cpp's row order."""
    heads = rotary_heads(hf_name, cfg)
    return rows if heads is None else interleave_rotary_rows(rows, heads)


def rope_factors(cfg: ModelConfig) -> np.ndarray | None:
    """LLaMA-3.1 rope scaling as llama.cpp takes it: `rope_freqs.weight`, one divisor per rotary
    frequency (llama.cpp divides theta^(-2i/H) by it). Derived from our own scaled frequencies,
    so the two cannot disagree; None without scaling."""
    if cfg.rope_scaling is None:
        return None
    plain = rope_inverse_frequencies(cfg.resolved_head_dim, cfg.rope_theta)
    scaled = rope_inverse_frequencies(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
    return (plain.astype(np.float64) / scaled.astype(np.float64)).astype(np.float32)


def encoding(shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType, name: str) -> gguf.GGMLQuantizationType:
    """The encoding of one tensor: 1-D tensors f32; a matrix `wanted`, or f16 where its rows do
    not split into whole quantization blocks."""
    if len(shape) < 2:
        return Q.F32
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block:
        log.warning("export-gguf: %s has rows of %d, not a multiple of %s's block of %d; written as f16",
                    name, shape[-1], wanted.name.lower(), block)
        return Q.F16
    return wanted


def encoded_nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows * (shape[-1] // block) * type_size


def encode(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """`array` (float32) as the bytes llama.cpp reads for `qtype`."""
    if qtype == Q.F32:
        return np.ascontiguousarray(array, np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(array, np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, np.float32), qtype)
