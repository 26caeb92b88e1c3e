"""Instruction data: loading, Alpaca templates, tokenization with response-only loss, packing."""

from alpaca_jax.data.dataset import BatchIterator
from alpaca_jax.data.packing import BATCH_KEYS, pack_rows, plan_rows
from alpaca_jax.data.records import DataError, load_instruction_dataset, read_records, resolve_data_path
from alpaca_jax.data.templates import alpaca_prompt
from alpaca_jax.data.tokenize import TokenizeStats, build_example, tokenize_dataset
from alpaca_jax.data.tokenizer import get_tokenizer, load_tokenizer, special_ids, train_bpe_tokenizer

__all__ = ["BatchIterator", "BATCH_KEYS", "pack_rows", "plan_rows", "DataError",
           "load_instruction_dataset", "read_records", "resolve_data_path", "alpaca_prompt",
           "TokenizeStats", "build_example", "tokenize_dataset", "get_tokenizer",
           "load_tokenizer", "special_ids", "train_bpe_tokenizer"]
