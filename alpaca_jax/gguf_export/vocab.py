"""The tokenizer as llama.cpp reads it: `tokenizer.ggml.*` metadata that encodes as training did.

Read from the Hugging Face tokenizer training loaded (its `tokenizers` JSON), since those are the
ids the model learned. Three kinds, each mapped onto the llama.cpp tokenizer that computes the
same thing:

- SentencePiece BPE (LLaMA-1/2; `byte_fallback`): llama.cpp's `llama` tokenizer. It merges the
  adjacent pair whose joined piece has the highest score, so each piece's score is minus the
  rank of the first HF merge that makes it: the merge order HF applies. `add_space_prefix`
  is whether HF puts a `▁` in front of the text, found by normalizing probe strings with the
  tokenizer itself, not by matching the many JSON spellings of the same rule.
- tiktoken-style BPE (LLaMA-3): llama.cpp's `gpt2` tokenizer with the `llama-bpe` pre-tokenizer,
  when the split regex is LLaMA-3's and merges are ignored for whole-vocabulary words, as there.
- The run's own byte-level BPE (data/tokenizer.py): GPT-2's ByteLevel pre-tokenizer, i.e. the
  `gpt2` tokenizer with llama.cpp's `gpt-2` pre-tokenizer (the same regex).

Anything else (a Unigram model, a normalizer llama.cpp would not apply, another regex) is an
error naming what differs: a file that tokenizes differently from training would answer
prompts the model never saw. The vocabulary is padded to `model.vocab_size` with unused
`[PAD<id>]` tokens, as llama.cpp's converter does.

Not here: the chat template (hf/chat_template.py), the weights (tensors.py).
"""

from __future__ import annotations

import dataclasses
import json
import re

import gguf
from tokenizers import Tokenizer

from alpaca_jax.hf.errors import ConversionError

TokenType = gguf.TokenType
SPACE = "\u2581"  # SentencePiece's visible space
# LLaMA-3's split regex, as its tokenizer.json spells it (llama.cpp's `llama-bpe` implements it).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Text whose handling must equal llama.cpp's for a SentencePiece tokenizer (no leading space:
# there HF's Metaspace and llama.cpp legitimately differ, and no prompt starts with one).
SPACE_PROBES = ("Below is an instruction.", "two  spaces\n\tand a tab ", "Café 東京 12345\n\n### Response:")
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclasses.dataclass(frozen=True)
class GgufVocab:
    model: str                      # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str                        # tokenizer.ggml.pre: "default", "gpt-2" or "llama-bpe"
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None      # SentencePiece only
    merges: list[str] | None        # byte-level BPE only ("left right")
    add_space_prefix: bool | None   # SentencePiece only
    special_ids: dict[str, int]     # bos / eos / unk / pad -> id, those the tokenizer has


def gguf_vocab(tokenizer, vocab_size: int, where: str) -> GgufVocab:
    """The llama.cpp vocabulary of a HF fast tokenizer, padded to `vocab_size` ids."""
    backend: Tokenizer = tokenizer.backend_tokenizer
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ConversionError(f"{where}: a {model.get('type')} tokenizer has no llama.cpp counterpart here "
                              f"(SentencePiece BPE, LLaMA-3 BPE and byte-level BPE are supported)")
    for field in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(field):
            raise ConversionError(f"{where}: BPE {field}={model[field]!r} has no llama.cpp counterpart")
    added = {token["id"]: token for token in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    if max(by_id) >= vocab_size:
        raise ConversionError(f"{where}: token id {max(by_id)} does not fit model.vocab_size={vocab_size}")
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    special_ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")}
    special_ids = {name: i for name, i in special_ids.items() if i is not None}

    sentencepiece = bool(model.get("byte_fallback"))
    if sentencepiece:
        kind, pre, add_space_prefix = "llama", "default", _space_prefix(backend, where)
    else:
        kind, pre, add_space_prefix = "gpt2", _byte_level_pre(spec, where), None
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(token)
        if sentencepiece and i == special_ids.get("unk"):
            types.append(TokenType.UNKNOWN)
        elif i in added:
            types.append(TokenType.CONTROL if added[i]["special"] else TokenType.USER_DEFINED)
        elif sentencepiece and BYTE_TOKEN.fullmatch(token):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    if len(set(tokens)) != len(tokens):
        raise ConversionError(f"{where}: the vocabulary has a token text twice (llama.cpp needs them distinct)")
    return GgufVocab(model=kind, pre=pre, tokens=tokens, token_types=[int(t) for t in types],
                     scores=_merge_scores(tokens, merges) if sentencepiece else None,
                     merges=None if sentencepiece else [f"{a} {b}" for a, b in merges],
                     add_space_prefix=add_space_prefix, special_ids=special_ids)


def _merge_scores(tokens: list[str], merges: list[list[str]]) -> list[float]:
    """Score = -(rank of the first merge producing the piece): llama.cpp's SentencePiece
    tokenizer then joins pairs in HF's merge order. Pieces no merge makes (characters, bytes,
    specials) are never looked up as a merge result; they get 0."""
    first_rank: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first_rank.setdefault(left + right, rank)
    return [-float(first_rank[t]) if t in first_rank else 0.0 for t in tokens]


def _seen_by_model(backend: Tokenizer, text: str) -> list[str]:
    """The pieces of `text` that reach the BPE model after normalizing and pre-tokenizing."""
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    if backend.pre_tokenizer is not None:
        return [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    return [text]


def _space_prefix(backend: Tokenizer, where: str) -> bool:
    """llama.cpp's SentencePiece input is the text with spaces as `▁`, with one `▁` in front
    when add_space_prefix: which of the two the HF tokenizer does, checked on probe strings."""
    for add_space_prefix in (True, False):
        if all(_seen_by_model(backend, probe) == [(SPACE if add_space_prefix else "") + probe.replace(" ", SPACE)]
               for probe in SPACE_PROBES):
            return add_space_prefix
    probe = SPACE_PROBES[1]
    raise ConversionError(f"{where}: the tokenizer turns {probe!r} into {_seen_by_model(backend, probe)!r} before "
                          f"BPE; llama.cpp's SentencePiece tokenizer only replaces spaces with {SPACE!r} "
                          f"(and may prepend one), so it would tokenize differently from training")


def _byte_level_pre(spec: dict, where: str) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE, if it splits text as this one does."""
    pre, normalizer = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if normalizer is not None:
        raise ConversionError(f"{where}: a byte-level BPE with a {normalizer.get('type')} normalizer has no "
                              f"llama.cpp counterpart")
    if _is_byte_level(pre, use_regex=True):
        return "gpt-2"  # GPT-2's regex inside ByteLevel: llama.cpp's `gpt-2` pre-tokenizer
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert") and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
            and _is_byte_level(steps[1], use_regex=False)):
        if not spec["model"].get("ignore_merges"):
            raise ConversionError(f"{where}: a LLaMA-3 split regex without ignore_merges; llama.cpp's "
                                  f"llama-bpe pre-tokenizer ignores merges for whole-vocabulary words")
        return "llama-bpe"
    raise ConversionError(f"{where}: the byte-level BPE's pre-tokenizer {json.dumps(pre)[:200]} is not one "
                          f"llama.cpp knows (GPT-2's ByteLevel regex, or LLaMA-3's split regex)")


def _is_byte_level(step: dict, use_regex: bool) -> bool:
    return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space", False)
            and step.get("use_regex", True) == use_regex)
