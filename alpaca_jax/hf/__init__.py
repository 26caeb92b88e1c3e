"""Hugging Face LLaMA <-> ours: the key map, config.json, streaming safetensors, export/import.

keymap.py (names and layouts, beside a table of both), config_json.py (LlamaConfig fields),
tensor_files.py (safetensors one tensor at a time), convert.py (the directory-level functions),
tokenizer_export.py (the exported tokenizer, fixed to encode as training did) and
chat_template.py (the training prompt format as a Jinja chat template).
"""

from alpaca_jax.hf.chat_template import alpaca_chat_template
from alpaca_jax.hf.config_json import (check_matches, hf_config_from_model, model_config_from_hf,
                                       read_hf_config)
from alpaca_jax.hf.convert import (export_hf, import_hf, load_hf_params, load_pretrained,
                                   pretrained_tokenizer_dir)
from alpaca_jax.hf.errors import ConversionError
from alpaca_jax.hf.tokenizer_export import export_tokenizer

__all__ = ["export_hf", "import_hf", "load_hf_params", "load_pretrained", "pretrained_tokenizer_dir",
           "model_config_from_hf", "hf_config_from_model", "read_hf_config", "check_matches",
           "ConversionError", "alpaca_chat_template", "export_tokenizer"]
