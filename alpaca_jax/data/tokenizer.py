"""Tokenizers: a local Hugging Face tokenizer, or a byte-level BPE trained for this run.

Either way the result is a `transformers.PreTrainedTokenizerFast`, so the rest of the code has
one path. A trained BPE is saved to `<run dir>/tokenizer/` (loadable with `AutoTokenizer`), so
an offline run is self-contained and its export ships the exact tokenizer it was trained with.
Nothing here touches the network: `AutoTokenizer` is only ever given local directories.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from alpaca_jax.data.records import DataError

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
# What AutoTokenizer reads; copied on export/import (never the weights beside them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model")  # a directory holds a tokenizer iff it has one


def find_tokenizer_dir(*candidates: str | Path | None) -> Path | None:
    """The first candidate directory that holds a tokenizer (tokenizer.json or tokenizer.model),
    or None: the one search for a run's, a checkpoint's and a pretrained directory's tokenizer."""
    for candidate in candidates:
        if candidate and any((Path(candidate) / f).is_file() for f in _VOCABULARY_FILES):
            return Path(candidate)
    return None


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The ids the pipeline needs. LLaMA tokenizers have no pad token: pad falls back to EOS
    (padding is never attended to across segments, nor counted in the loss)."""
    bos: int | None
    eos: int
    pad: int


def special_ids(tokenizer) -> SpecialIds:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; responses must end with one")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return SpecialIds(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=pad)


def load_tokenizer(path: str | Path):
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"tokenizer directory not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style: no unknown bytes, lossless decode) trained on `texts`.

    The pre-tokenizer is GPT-2's (ByteLevel with its regex, no prefix space), which llama.cpp
    implements as its `gpt-2` pre-tokenizer: `export-gguf` labels the run's BPE so, and
    tests/test_gguf.py checks llama.cpp's ids against ours. Another split would need a
    pre-tokenizer llama.cpp knows."""
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def get_tokenizer(tokenizer_cfg, model_vocab_size: int, run_dir: Path, texts: Iterable[str]):
    """The configured tokenizer, or the run's own BPE (reused if already in the run dir)."""
    if tokenizer_cfg.path:
        tokenizer = load_tokenizer(tokenizer_cfg.path)
    else:
        saved = run_dir / "tokenizer"
        if (saved / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(saved)
        else:
            vocab = tokenizer_cfg.vocab_size or model_vocab_size
            tokenizer = train_bpe_tokenizer(texts, vocab, tokenizer_cfg.min_frequency)
            tokenizer.save_pretrained(str(saved))
    if len(tokenizer) > model_vocab_size:
        raise DataError(f"tokenizer has {len(tokenizer)} tokens but model.vocab_size is "
                        f"{model_vocab_size}; raise model.vocab_size")
    return tokenizer
