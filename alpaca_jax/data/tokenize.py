"""Tokenizing Alpaca rows into ids and a response-only loss mask.

An example is `[BOS] prompt response [EOS]`. Prompt and response are tokenized separately and
concatenated, so the prompt/response boundary is exact whatever the tokenizer merges (the
original recipe tokenized the joined string and masked the prompt's token count, which can be
off by one at the seam). The loss mask is True on response tokens and the EOS, so the model
learns to stop. Examples longer than `max_len` are truncated from the end of the response;
those whose prompt alone fills `max_len` have nothing to learn from and are dropped. Both are
counted and reported.
"""

from __future__ import annotations

import dataclasses

import datasets
import numpy as np

from alpaca_jax.data.templates import alpaca_prompt
from alpaca_jax.data.tokenizer import special_ids


@dataclasses.dataclass(frozen=True)
class TokenizeStats:
    examples: int      # rows read
    kept: int          # rows with at least one response token after truncation
    truncated: int     # rows cut to max_len
    dropped: int       # rows whose prompt alone reaches max_len
    tokens: int        # tokens kept, all kinds
    loss_tokens: int   # tokens kept that carry loss (response + EOS)


def build_example(prompt_ids: list[int], response_ids: list[int], bos: int | None, eos: int,
                  max_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ids, loss_mask, truncated) for one example; ids is at most max_len long."""
    prompt = ([bos] if bos is not None else []) + list(prompt_ids)
    response = list(response_ids) + [eos]
    ids = np.asarray(prompt + response, np.int32)
    mask = np.zeros(len(ids), np.bool_)
    mask[len(prompt):] = True
    truncated = len(ids) > max_len
    return ids[:max_len], mask[:max_len], truncated


def tokenize_dataset(ds: datasets.Dataset, tokenizer, max_len: int, add_bos: bool = True,
                     num_proc: int | None = None) -> tuple[datasets.Dataset, TokenizeStats]:
    """Map Alpaca rows to columns `input_ids`, `loss_mask`; returns the kept rows and stats."""
    ids = special_ids(tokenizer)
    bos = ids.bos if add_bos else None

    def _encode(batch):
        prompts = [alpaca_prompt(i, x) for i, x in zip(batch["instruction"], batch["input"])]
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(batch["output"], add_special_tokens=False)["input_ids"]
        out = {"input_ids": [], "loss_mask": [], "truncated": []}
        for p, r in zip(prompt_ids, response_ids):
            example, mask, truncated = build_example(p, r, bos, ids.eos, max_len)
            out["input_ids"].append(example)
            out["loss_mask"].append(mask)
            out["truncated"].append(truncated)
        return out

    tokenized = ds.map(_encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                       desc="tokenizing", load_from_cache_file=False)
    has_loss = np.array([bool(np.any(m[1:])) for m in tokenized["loss_mask"]], dtype=bool)
    truncated = np.asarray(tokenized["truncated"], dtype=bool)
    kept = tokenized.select(np.flatnonzero(has_loss)).remove_columns("truncated")
    lengths = np.array([len(x) for x in kept["input_ids"]], dtype=np.int64)
    stats = TokenizeStats(
        examples=len(ds), kept=len(kept), truncated=int(truncated.sum()),
        dropped=int((~has_loss).sum()), tokens=int(lengths.sum()),
        loss_tokens=int(sum(int(np.sum(m)) for m in kept["loss_mask"])))
    return kept.with_format("numpy"), stats
