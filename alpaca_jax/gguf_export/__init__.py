"""Our models as GGUF, the file format of llama.cpp (and of everything built on it: llama-server,
llama-cpp-python, Ollama, LM Studio): laptop and Raspberry Pi inference, as alpaca.cpp offered.

tensors.py (llama.cpp's tensor names, q/k row order and encodings), vocab.py (the tokenizer as
`tokenizer.ggml.*` metadata), export.py (`export_gguf`: a run, merged LoRA run, HF directory or
LoRA adapters, written with the `gguf` package, llama.cpp's own writer).
"""

from alpaca_jax.gguf_export.export import export_gguf
from alpaca_jax.gguf_export.tensors import TYPES
from alpaca_jax.gguf_export.vocab import GgufVocab, gguf_vocab

__all__ = ["export_gguf", "TYPES", "GgufVocab", "gguf_vocab"]
