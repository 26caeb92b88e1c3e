"""Tokenizing rendered conversations into ids and an assistant-only loss mask.

An example is `[BOS] text`, where `text` is a conversation rendered by a chat template
(chat.py), end-of-turn tokens included as text (e.g. `</s>`, which the tokenizer reads as EOS,
as the original recipes' `f"{output}{eos_token}"` did). The whole text is tokenized at once, as
Stanford Alpaca and FastChat did: tokenizing prompt and response separately differs for a
SentencePiece tokenizer (LLaMA-1/2), whose first response token would then start a new word
(`▁The` instead of `The`) in every example. The loss mask comes from the tokenizer's offset
mapping: a token carries loss when its characters overlap an assistant span.

A token that straddles the boundary (holds the last prompt characters and the first response
characters, e.g. Vicuna's `ASSISTANT: Paris`, tokenized `▁Paris` with the space belonging to the
separator) is a response token: the model must produce it to start the answer, and masking it
would leave the answer's first word untrained. FastChat's `-2` offset trains the same token.

Too-long conversations (`long="truncate"`) keep the exchanges that fit whole; when even the
first one does not fit, its response is cut at `max_len` (Alpaca's behaviour). With
`long="split"` the exchanges are grouped into several examples that fit, each rendered again
with the system turn. Examples left without a loss token are dropped. All of it is counted.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import datasets
import numpy as np

from alpaca_jax.data.chat import ChatTemplate, Rendered, chat_template
from alpaca_jax.data.conversations import Conversation, Turn
from alpaca_jax.data.records import DataError
from alpaca_jax.data.tokenizer import special_ids

_BATCH = 1024  # texts per tokenizer call: large enough for the Rust tokenizer's threads


@dataclasses.dataclass(frozen=True)
class TokenizeStats:
    examples: int      # conversations (or Alpaca rows) read
    kept: int          # examples produced with at least one loss token (splits count each piece)
    truncated: int     # conversations cut to max_len (at a turn boundary, or inside the first response)
    dropped: int       # examples without a loss token within max_len (the prompt fills it)
    tokens: int        # tokens kept, all kinds
    loss_tokens: int   # tokens kept that carry loss (assistant turns + end-of-turn)
    split: int = 0     # conversations split into several examples (long="split")


def build_example(prompt_ids: list[int], response_ids: list[int], bos: int | None, eos: int,
                  max_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ids, loss_mask, truncated) for one already-tokenized prompt/response pair."""
    prompt = ([bos] if bos is not None else []) + list(prompt_ids)
    response = list(response_ids) + [eos]
    ids = np.asarray(prompt + response, np.int32)
    mask = np.zeros(len(ids), np.bool_)
    mask[len(prompt):] = True
    truncated = len(ids) > max_len
    return ids[:max_len], mask[:max_len], truncated


def loss_mask_from_offsets(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """True for each token whose [start, end) characters overlap one of the spans."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(offsets), np.bool_)
    for s, e in spans:
        mask |= (ends > s) & (starts < e)
    return mask


def _encode(tokenizer, renders: Sequence[Rendered], bos: int | None):
    """(ids, mask, token starts) per rendered text; BOS prepended as an id."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("the tokenizer has no offset mapping (not a fast tokenizer); load a "
                        "directory with tokenizer.json")
    out = []
    head = [bos] if bos is not None else []
    for i in range(0, len(renders), _BATCH):
        chunk = renders[i:i + _BATCH]
        enc = tokenizer([r.text for r in chunk], add_special_tokens=False, return_offsets_mapping=True)
        for r, ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
            offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
            mask = loss_mask_from_offsets(offsets, r.loss_spans)
            out.append((np.asarray(head + ids, np.int32), np.concatenate([[False] * len(head), mask]),
                        np.concatenate([[-1] * len(head), offsets[:, 0]])))
    return out


def _token_index(starts: np.ndarray, char: int) -> int:
    """Number of tokens (BOS included) that start before character `char`."""
    return int(np.searchsorted(starts, char, side="left"))


def _exchange_groups(r: Rendered, starts: np.ndarray, max_len: int) -> list[tuple[int, int]]:
    """Consecutive exchanges [a, b) whose tokens, plus the header's, fit in max_len."""
    header = _token_index(starts, r.header_end)
    bounds = [header] + [_token_index(starts, c) for c in r.exchange_ends]
    groups, a = [], 0
    for b in range(1, len(bounds)):
        if b - 1 > a and header + bounds[b] - bounds[a] > max_len:
            groups.append((a, b - 1))
            a = b - 1
    groups.append((a, len(bounds) - 1))
    return groups


def tokenize_conversations(conversations: Sequence[Conversation], tokenizer, template: ChatTemplate,
                           max_len: int, add_bos: bool = True,
                           long: Literal["truncate", "split"] = "truncate",
                           ) -> tuple[list[np.ndarray], list[np.ndarray], TokenizeStats]:
    """Conversations -> (input_ids, loss_mask) per kept example, and the counts."""
    ids = special_ids(tokenizer)
    if tokenizer(tokenizer.eos_token, add_special_tokens=False)["input_ids"] != [ids.eos]:
        raise DataError(f"the tokenizer does not read its EOS text {tokenizer.eos_token!r} as one "
                        f"token; end-of-turn would be lost")
    bos = ids.bos if add_bos else None
    renders = [template.render(c) for c in conversations]
    examples: list[tuple[np.ndarray, np.ndarray]] = []
    truncated = split = 0
    pieces: list[Conversation] = []
    for conv, r, (x, mask, starts) in zip(conversations, renders, _encode(tokenizer, renders, bos)):
        if len(x) <= max_len:
            examples.append((x, mask))
            continue
        groups = _exchange_groups(r, starts, max_len)
        if long == "split" and len(groups) > 1:
            split += 1
            pieces.extend(conv.with_exchanges(a, b) for a, b in groups)
            continue
        truncated += 1
        # Whole exchanges that fit; max_len itself when the first exchange alone is too long.
        cut = min(_token_index(starts, r.exchange_ends[groups[0][1] - 1]), max_len)
        examples.append((x[:cut], mask[:cut]))
    if pieces:  # split pieces, rendered again (each with the system turn) and cut if still long
        piece_renders = [template.render(c) for c in pieces]
        for x, mask, _ in _encode(tokenizer, piece_renders, bos):
            truncated += len(x) > max_len
            examples.append((x[:max_len], mask[:max_len]))
    has_loss = [bool(m[1:].any()) for _, m in examples]
    kept = [e for e, keep in zip(examples, has_loss) if keep]
    stats = TokenizeStats(
        examples=len(conversations), kept=len(kept), truncated=truncated,
        dropped=len(examples) - len(kept), tokens=sum(len(x) for x, _ in kept),
        loss_tokens=sum(int(m.sum()) for _, m in kept), split=split)
    return [x for x, _ in kept], [m for _, m in kept], stats


def alpaca_conversations(ds: datasets.Dataset | Sequence[dict]) -> list[Conversation]:
    """Alpaca rows {instruction, input, output} as single-turn conversations."""
    return [Conversation((Turn("user", r["instruction"], r.get("input") or ""),
                          Turn("assistant", r["output"]))) for r in ds]


def tokenize_dataset(ds: datasets.Dataset, tokenizer, max_len: int, add_bos: bool = True,
                     num_proc: int | None = None, template: str | ChatTemplate = "alpaca",
                     ) -> tuple[datasets.Dataset, TokenizeStats]:
    """Alpaca rows -> a numpy-formatted Dataset with `input_ids`, `loss_mask`, and the counts.

    Each row is a one-exchange conversation rendered with `template` (the run's `data.template`;
    a model trained with Vicuna's format is scored in Vicuna's format): one code path for every
    format. `num_proc` is accepted for compatibility; the fast tokenizer batches with its own threads.
    """
    del num_proc
    if not isinstance(template, ChatTemplate):
        template = chat_template(template, tokenizer)
    input_ids, loss_mask, stats = tokenize_conversations(alpaca_conversations(ds), tokenizer, template,
                                                         max_len, add_bos)
    kept = datasets.Dataset.from_dict({"input_ids": input_ids, "loss_mask": loss_mask})
    return kept.with_format("numpy"), stats
