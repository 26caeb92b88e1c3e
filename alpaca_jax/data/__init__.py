"""Instruction data and conversations: loading, chat templates, tokenization with
assistant-only loss, weighted mixtures, packing."""

from alpaca_jax.data.chat import ChatTemplate, Rendered, chat_template
from alpaca_jax.data.conversations import (Conversation, LoadReport, Turn, conversations_from_rows,
                                           flatten_message_trees, read_conversations)
from alpaca_jax.data.dataset import BatchIterator
from alpaca_jax.data.mixture import MixtureOrder, Source, corpus_texts, load_sources, tokenize_sources
from alpaca_jax.data.packing import BATCH_KEYS, pack_rows, plan_rows
from alpaca_jax.data.preference import PreferencePair, read_pairs
from alpaca_jax.data.preference_batches import PairBatchIterator, tokenize_pairs
from alpaca_jax.data.prompt import (PromptError, PromptTooLongError, alpaca_messages, encode_prompt, encode_text,
                                    render_prompt)
from alpaca_jax.data.records import DataError, load_instruction_dataset, read_records, resolve_data_path
from alpaca_jax.data.templates import alpaca_prompt
from alpaca_jax.data.tokenize import (TokenizeStats, alpaca_conversations, build_example, tokenize_conversations,
                                      tokenize_dataset)
from alpaca_jax.data.tokenizer import get_tokenizer, load_tokenizer, special_ids, train_bpe_tokenizer

__all__ = ["ChatTemplate", "Rendered", "chat_template", "encode_prompt", "encode_text", "render_prompt",
           "alpaca_messages", "PromptError", "PromptTooLongError",
           "Conversation", "LoadReport", "Turn", "conversations_from_rows", "flatten_message_trees",
           "read_conversations", "BatchIterator", "MixtureOrder", "Source", "corpus_texts",
           "load_sources", "tokenize_sources", "BATCH_KEYS", "pack_rows", "plan_rows", "DataError",
           "load_instruction_dataset", "read_records", "resolve_data_path", "alpaca_prompt",
           "TokenizeStats", "alpaca_conversations", "build_example", "tokenize_conversations",
           "tokenize_dataset", "get_tokenizer", "load_tokenizer", "special_ids", "train_bpe_tokenizer",
           "PreferencePair", "read_pairs", "PairBatchIterator", "tokenize_pairs"]
