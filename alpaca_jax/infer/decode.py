"""The decode loop: a jitted prefill and a jitted one-token step over a KV cache, driven from
the host, which detokenizes, checks stop conditions and streams text as tokens arrive.

A batch is a list of `Row`s (prompt ids, sampling settings, an optional callback), so rows from
unrelated requests decode together. Prompts are right-padded to a shared bucketed length; each
row keeps its own positions (slot = position in the cache), so padding never changes a row's
tokens. Both jitted functions are compiled once per (batch, prompt, cache) bucket.

Not here: model loading (loader.py), sampling math (sampling.py), HTTP (serve.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.infer.cache import bucket, init_cache, length_bucket
from alpaca_jax.infer.loader import LoadedModel
from alpaca_jax.infer.sampling import SamplingConfig, sample_next
from alpaca_jax.infer.text import TextTracker
from alpaca_jax.model import Llama
from alpaca_jax.model.attention import KVCache


class PromptError(ValueError):
    """A prompt that cannot be decoded (empty, or too long); the message says which."""


class PromptTooLongError(PromptError):
    """A prompt leaves no room in the model's context for even one generated token."""


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str                 # the generated text (cut before a stop string; no EOS)
    token_ids: list[int]      # generated tokens (EOS excluded; up to the one completing a stop string)
    prompt_tokens: int        # prompt length in tokens, BOS included
    finish_reason: str        # "stop" (EOS or a stop string) or "length" (max_new_tokens or context full)


@dataclasses.dataclass
class Row:
    """One prompt to decode. `on_text(piece)` receives settled text as it is decoded; returning
    False cancels the row (a disconnected client), which then finishes with what it has."""
    prompt_ids: list[int]
    sampling: SamplingConfig
    on_text: Callable[[str], bool | None] | None = None


def _write(cache: KVCache, new: KVCache, positions: jax.Array) -> KVCache:
    """Store the new tokens' keys/values [L, B, T, K, H] at slots `positions` [B, T] of the
    [L, B, K, S, H] cache, all layers at once (in place: the cache buffer is donated)."""
    rows = jnp.arange(positions.shape[0])[:, None]
    # Index arrays on dims 1 and 3 around a slice: numpy rules put their [B, T] dims first, so
    # the update is laid out [B, T, L, K, H].
    def put(buffer, values):
        return buffer.at[:, rows, :, positions].set(jnp.transpose(values, (1, 2, 0, 3, 4)).astype(buffer.dtype))
    return KVCache(key=put(cache.key, new.key), value=put(cache.value, new.value))


@functools.partial(jax.jit, static_argnames=("model", "cache_len"))
def _prefill(params, ids, lengths, seeds, temperature, top_k, top_p, *, model: Llama, cache_len: int):
    """Right-padded prompts [B, T] -> each row's first generated token [B] and the cache."""
    batch, length = ids.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    # Nothing is cached yet: the prompt attends to itself alone (an empty, zero-slot cache).
    logits, new = model.apply({"params": params}, ids, positions, None, cache=init_cache(model.config, batch, 0),
                              logits_at=lengths - 1)
    cache = _write(init_cache(model.config, batch, cache_len), new, positions)
    return sample_next(logits[:, 0], seeds, lengths, temperature, top_k, top_p), cache


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _decode_step(params, tokens, positions, cache, seeds, temperature, top_k, top_p, *, model: Llama):
    """Each row's last token [B] at its position [B] -> the next token [B] and the cache."""
    logits, new = model.apply({"params": params}, tokens[:, None], positions[:, None], None,
                              cache=cache, logits_at=jnp.zeros_like(positions))
    cache = _write(cache, new, positions[:, None])
    return sample_next(logits[:, 0], seeds, positions + 1, temperature, top_k, top_p), cache


def encode_prompt(model: LoadedModel, prompt: str) -> list[int]:
    """Prompt ids, checked to leave room for at least one generated token."""
    ids = model.encode(prompt)
    if not ids:
        raise PromptError("the prompt is empty (and the model takes no BOS token)")
    if len(ids) >= model.max_len:
        raise PromptTooLongError(f"the prompt has {len(ids)} tokens; the model's context is "
                                 f"{model.max_len} tokens, and at least one must be left to generate")
    return ids


def _row_settings(rows: Sequence[Row], batch: int):
    """Per-row sampling arrays, padded to the batch bucket with greedy dummy rows."""
    pad = batch - len(rows)
    def column(get, dtype):
        return jnp.asarray([get(r.sampling) for r in rows] + [0] * pad, dtype)
    return (column(lambda s: s.seed % 2**32, jnp.uint32), column(lambda s: s.temperature, jnp.float32),
            column(lambda s: s.top_k, jnp.int32),
            jnp.asarray([r.sampling.top_p for r in rows] + [1.0] * pad, jnp.float32))


def decode_rows(model: LoadedModel, rows: Sequence[Row], max_batch: int = 16) -> list[Completion]:
    """Decode every row together (len(rows) <= max_batch) and return their completions in order."""
    assert 0 < len(rows) <= max_batch, (len(rows), max_batch)
    lengths = [len(r.prompt_ids) for r in rows]
    if min(lengths) == 0:
        raise PromptError("a prompt has no tokens")
    if max(lengths) >= model.max_len:
        raise PromptTooLongError(f"a prompt has {max(lengths)} tokens; the context is {model.max_len}")
    budgets = [min(r.sampling.max_new_tokens, model.max_len - n) for r, n in zip(rows, lengths)]
    batch = bucket(len(rows), max_batch)
    prompt_len = length_bucket(max(lengths), model.max_len)
    # The last generated token is never written back, so prompt + budget - 1 slots suffice.
    cache_len = max(prompt_len, length_bucket(max(n + b - 1 for n, b in zip(lengths, budgets)), model.max_len))

    eos = model.eos_id
    pad_id = eos if model.tokenizer.pad_token_id is None else model.tokenizer.pad_token_id
    ids = np.full((batch, prompt_len), pad_id, np.int32)
    for i, prompt in enumerate(rows):
        ids[i, :len(prompt.prompt_ids)] = prompt.prompt_ids
    row_lengths = np.asarray(lengths + [1] * (batch - len(rows)), np.int32)
    settings = _row_settings(rows, batch)
    llama = Llama(model.config)

    tokens, cache = _prefill(model.params, jnp.asarray(ids), jnp.asarray(row_lengths), *settings,
                             model=llama, cache_len=cache_len)
    positions = row_lengths.copy()  # where each row's newest token goes
    trackers = [TextTracker(model.tokenizer, r.sampling.stop) for r in rows]
    generated: list[list[int]] = [[] for _ in rows]
    finish: list[str | None] = [None] * len(rows)
    while True:
        # Start the next step before reading this one's tokens: the device computes while the
        # host detokenizes. A step past every row's end is wasted work, never wrong output.
        host_tokens = tokens
        if any(f is None for f in finish):
            tokens, cache = _decode_step(model.params, tokens, jnp.asarray(positions), cache, *settings,
                                         model=llama)
        host_tokens = np.asarray(host_tokens)
        for i, row in enumerate(rows):
            if finish[i] is None:
                finish[i] = _advance(row, int(host_tokens[i]), eos, trackers[i], generated[i], budgets[i])
        if all(f is not None for f in finish):
            break
        # Finished rows stop advancing (their slots are never read again); live ones never pass
        # cache_len - 1 because their budget was sized to fit.
        positions = np.minimum(positions + 1, cache_len - 1)
    return [Completion(text=t.text, token_ids=g, prompt_tokens=n, finish_reason=f)
            for t, g, n, f in zip(trackers, generated, lengths, finish)]


def _advance(row: Row, token: int, eos: int, tracker: TextTracker, generated: list[int],
             budget: int) -> str | None:
    """Take one sampled token for a live row; its finish reason if it is now done, else None."""
    if token == eos:
        reason = "stop"
        piece = tracker.finish()
    else:
        generated.append(token)
        piece = tracker.add(token)
        reason = "stop" if tracker.stopped else ("length" if len(generated) >= budget else None)
        if reason is not None:
            piece += tracker.finish()
    if row.on_text is not None and piece and row.on_text(piece) is False:
        return reason or "stop"  # the listener is gone: stop spending steps on this row
    return reason


def generate(model: LoadedModel, prompts: list[str], sampling: SamplingConfig = SamplingConfig(), *,
             batch_size: int = 16) -> list[Completion]:
    """Complete already-formatted prompts (BOS added when the model was trained with it).

    Prompts are decoded `batch_size` at a time, shortest first (less padding), and returned in
    the order given. The result for a prompt does not depend on the others in its batch.
    """
    encoded = [encode_prompt(model, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[Completion | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        done = decode_rows(model, [Row(encoded[i], sampling) for i in chunk], batch_size)
        for i, completion in zip(chunk, done):
            results[i] = completion
    return results
