"""Hugging Face LLaMA <-> ours: the key map, config.json, streaming safetensors, export/import.

keymap.py (names and layouts, beside a table of both), config_json.py (LlamaConfig fields),
tensor_files.py (safetensors one tensor at a time), convert.py (the directory-level functions),
peft.py (LoRA adapters in PEFT's format, merged exports).
"""

from alpaca_jax.hf.config_json import (check_matches, hf_config_from_model, model_config_from_hf,
                                       read_hf_config)
from alpaca_jax.hf.convert import (export_hf, import_hf, load_hf_params, load_pretrained,
                                   pretrained_tokenizer_dir)
from alpaca_jax.hf.errors import ConversionError
from alpaca_jax.hf.peft import export_peft, load_peft_adapter

__all__ = ["export_hf", "import_hf", "load_hf_params", "load_pretrained", "pretrained_tokenizer_dir",
           "model_config_from_hf", "hf_config_from_model", "read_hf_config", "check_matches",
           "ConversionError", "export_peft", "load_peft_adapter"]
