"""Decoding our models: loading, a KV-cached decode loop, sampling, stop strings.

No HTTP and no command line here: `alpaca_jax.serve`, `alpaca_jax.chat` and
`alpaca_jax.respond` are built on these functions.
"""

from alpaca_jax.data.prompt import PromptError, PromptTooLongError
from alpaca_jax.data.templates import alpaca_prompt as format_alpaca_prompt
from alpaca_jax.infer.decode import (Completion, DecodeBatch, Row, decode_rows, generate, stream_completions,
                                     stream_rows)
from alpaca_jax.infer.loader import LoadedModel, load_model
from alpaca_jax.infer.sampling import SamplingConfig, sample_next, sampling_mask
from alpaca_jax.infer.text import TextTracker

__all__ = ["load_model", "LoadedModel", "SamplingConfig", "generate", "stream_completions", "stream_rows",
           "Completion", "Row",
           "decode_rows", "DecodeBatch", "PromptError", "PromptTooLongError", "format_alpaca_prompt",
           "sample_next", "sampling_mask", "TextTracker"]
