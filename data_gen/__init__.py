"""Self-Instruct / Alpaca instruction-data generation through a teacher LLM.

Stands alone: it never imports alpaca_jax model or training code (only the generic config
library `alpaca_jax.configlib`).
"""

from alpaca_jax.llm.rouge import lcs_length, rouge_l_fmeasure, rouge_tokenize, unicode_tokenize
from data_gen.config import GenerateConfig, load_config
from data_gen.curate import curate_file
from data_gen.dedup import RougeDeduplicator, dedup_file, deduplicate
from data_gen.generate import generate

__all__ = ["GenerateConfig", "load_config", "generate", "curate_file", "RougeDeduplicator", "deduplicate",
           "dedup_file", "rouge_tokenize", "unicode_tokenize", "lcs_length", "rouge_l_fmeasure"]
