"""The decode loop: a jitted prefill and a jitted one-token step over a KV cache, driven from
the host, which detokenizes, checks stop conditions and streams text as tokens arrive.

A `DecodeBatch` holds the rows decoding together, each a `Row` (prompt ids, sampling settings,
an optional callback), so rows from unrelated requests share decode steps. Rows join between
steps (continuous batching): a newcomer's prompt is prefilled on its own and its cache rows are
copied into a free batch slot, while the other rows keep decoding. Each row keeps its own
positions (cache slot = position), so padding and neighbours never change a row's tokens.

Shapes are bucketed so that a new prompt length or batch size rarely compiles (cache.py):
batch slots, prompt lengths and cache lengths in powers of two. The cache grows to the next
length bucket only when a row's position reaches its end, so attention reads (about) as many
slots as the rows have used, not the most they might use.

Not here: model loading (loader.py), sampling math (sampling.py), HTTP (serve.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.data.prompt import check_fits
from alpaca_jax.infer.cache import bucket, cache_bucket, init_cache, prompt_bucket
from alpaca_jax.infer.loader import LoadedModel
from alpaca_jax.infer.sampling import SamplingConfig, sample_next
from alpaca_jax.infer.text import TextTracker
from alpaca_jax.model import Llama


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


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _prefill(params, ids, lengths, cache, seeds, temperature, top_k, top_p, *, model: Llama):
    """Right-padded prompts [B, T] -> each row's first generated token [B] and the cache with
    the prompts written in (slots 0..T-1; a row's padding slots are overwritten later)."""
    batch, length = ids.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    logits, cache = model.apply({"params": params}, ids, positions, None, cache=cache, logits_at=lengths - 1)
    return sample_next(logits[:, 0], seeds, lengths, temperature, top_k, top_p), cache


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _decode_step(params, tokens, positions, cache, seeds, temperature, top_k, top_p, *, model: Llama):
    """Each row's last token [B] at its position [B] -> the next token [B] and the cache (updated
    in place: the buffers are donated)."""
    logits, cache = model.apply({"params": params}, tokens[:, None], positions[:, None], None,
                                cache=cache, logits_at=jnp.zeros_like(positions))
    return sample_next(logits[:, 0], seeds, positions + 1, temperature, top_k, top_p), cache


def _settings(rows: Sequence["Row | None"]):
    """Per-slot sampling arrays (seed, temperature, top_k, top_p); empty slots decode greedily."""
    samplings = [r.sampling if r is not None else SamplingConfig() for r in rows]
    return (jnp.asarray([s.seed % 2**32 for s in samplings], jnp.uint32),
            jnp.asarray([s.temperature for s in samplings], jnp.float32),
            jnp.asarray([s.top_k for s in samplings], jnp.int32),
            jnp.asarray([s.top_p for s in samplings], jnp.float32))


@functools.partial(jax.jit, donate_argnames=("cache", "tokens"))
def _admit(cache, tokens, new_cache, new_tokens, slots):
    """Copy prefilled rows (their cache rows, prompt-length long, and first tokens) into batch
    `slots` of the running cache; padding rows of the prefill carry an out-of-range slot and are
    dropped. Cache positions past the prompt keep a former row's values: they are masked until
    this row's own decode steps overwrite them."""
    length = new_cache[0].key.shape[2]
    put = lambda old, new: old.at[slots, :, :length].set(new, mode="drop")  # noqa: E731
    return jax.tree.map(put, cache, new_cache), tokens.at[slots].set(new_tokens, mode="drop")


@functools.partial(jax.jit, static_argnames=("batch", "length"))
def _resize(cache, tokens, *, batch: int, length: int):
    """Grow the cache to `batch` slots of `length` positions (zeros after the old ones)."""
    def pad(x):
        return jnp.pad(x, ((0, batch - x.shape[0]), (0, 0), (0, length - x.shape[2]), (0, 0)))
    return jax.tree.map(pad, cache), jnp.pad(tokens, (0, batch - tokens.shape[0]))


@dataclasses.dataclass
class _Live:
    """A row being decoded: its text so far and what ends it."""
    row: Row
    tracker: TextTracker
    budget: int                # tokens it may generate (max_new_tokens, or what the context leaves)
    generated: list[int] = dataclasses.field(default_factory=list)

    def completion(self, finish_reason: str) -> Completion:
        return Completion(text=self.tracker.text, token_ids=self.generated,
                          prompt_tokens=len(self.row.prompt_ids), finish_reason=finish_reason)


class DecodeBatch:
    """Rows decoding together, joining between steps.

    `admit(rows)` prefills new rows into free slots (at most `free` of them); `step()` runs one
    decode step for every live row and returns the rows it finished with their completions.
    Each step is dispatched before the previous step's tokens are read back, so the device
    computes while the host detokenizes; a step past a row's end is wasted work, never output.
    """

    def __init__(self, model: LoadedModel, max_batch: int = 16):
        self.model, self.max_batch = model, max_batch
        self._llama = Llama(model.config)
        self._reset()

    def _reset(self) -> None:
        """No rows and no cache: the next rows start from the smallest shapes again."""
        self._slots: list[_Live | None] = []      # one per batch slot; None = free
        self._positions = np.zeros(0, np.int32)   # where each slot's next fed token goes (free: 0)
        self._cache = None                        # per layer KVCache [slots, K, cache_len, H]
        self._tokens = None                       # [slots] sampled, not yet read back or fed
        self._settings = None                     # per-slot sampling arrays (device)

    @property
    def live(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def free(self) -> int:
        return self.max_batch - self.live

    def _cache_len(self) -> int:
        return 0 if self._cache is None else self._cache[0].key.shape[2]

    def _resize(self, batch: int, length: int) -> None:
        if self._cache is None:
            self._cache, self._tokens = init_cache(self.model.config, batch, length), jnp.zeros(batch, jnp.int32)
        elif (batch, length) != (len(self._slots), self._cache_len()):
            self._cache, self._tokens = _resize(self._cache, self._tokens, batch=batch, length=length)
        self._slots += [None] * (batch - len(self._slots))
        self._positions = np.concatenate([self._positions, np.zeros(batch - len(self._positions), np.int32)])

    def admit(self, rows: Sequence[Row]) -> None:
        """Prefill `rows` (len(rows) <= free) into free slots; they decode from the next step."""
        assert 0 < len(rows) <= self.free, (len(rows), self.free)
        for row in rows:
            check_fits(row.prompt_ids, self.model.max_len)
        lengths = [len(r.prompt_ids) for r in rows]
        max_len = self.model.max_len
        prompt_len = prompt_bucket(max(lengths), max_len)
        self._resize(bucket(self.live + len(rows), self.max_batch),
                     max(cache_bucket(prompt_len, max_len), self._cache_len()))
        free = [i for i, s in enumerate(self._slots) if s is None][:len(rows)]

        batch = bucket(len(rows), self.max_batch)
        eos = self.model.eos_id
        pad_id = eos if self.model.tokenizer.pad_token_id is None else self.model.tokenizer.pad_token_id
        ids = np.full((batch, prompt_len), pad_id, np.int32)
        for i, row in enumerate(rows):
            ids[i, :lengths[i]] = row.prompt_ids
        row_lengths = np.asarray(lengths + [1] * (batch - len(rows)), np.int32)
        padded = list(rows) + [None] * (batch - len(rows))
        # The prefill's own cache is prompt-length long, so its compiled shape depends on the
        # newcomers alone, not on how far the running rows have got.
        first, cache = _prefill(self.model.params, jnp.asarray(ids), jnp.asarray(row_lengths),
                                init_cache(self.model.config, batch, prompt_len), *_settings(padded),
                                model=self._llama)
        slots = np.asarray(free + [len(self._slots)] * (batch - len(rows)), np.int32)  # padding: dropped
        self._cache, self._tokens = _admit(self._cache, self._tokens, cache, first, jnp.asarray(slots))
        for slot, row, n in zip(free, rows, lengths):
            self._slots[slot] = _Live(row, TextTracker(self.model.tokenizer, row.sampling.stop),
                                      budget=min(row.sampling.max_new_tokens, max_len - n))
            self._positions[slot] = n
        self._settings = _settings([s.row if s is not None else None for s in self._slots])

    def drop(self, rows: Sequence[Row]) -> None:
        """Free the slots of `rows` (their callers went away) without finishing them."""
        gone = {id(r) for r in rows}
        for i, state in enumerate(self._slots):
            if state is not None and id(state.row) in gone:
                self._slots[i] = None
                self._positions[i] = 0  # as a finished row's slot (see step)
        if not self.live:
            self._reset()

    def step(self) -> list[tuple[Row, Completion]]:
        """Feed every live row its newest token; return the rows that finished, with completions."""
        live = [i for i, s in enumerate(self._slots) if s is not None]
        if not live:
            return []
        # A row fed at position p needs slot p: grow the cache to the next length bucket first.
        # (p < max_len always: a row's budget stops it before its position passes the context.)
        newest = int(self._positions[live].max())
        if newest >= self._cache_len():
            self._resize(len(self._slots), cache_bucket(newest + 1, self.model.max_len))
        fed = self._tokens
        # A copy: on CPU the device array may alias the numpy buffer, and the step runs
        # asynchronously while the loop below advances self._positions in place.
        positions = jnp.asarray(self._positions.copy())
        self._tokens, self._cache = _decode_step(self.model.params, fed, positions, self._cache,
                                                 *self._settings, model=self._llama)
        host = np.asarray(fed)
        finished = []
        eos = self.model.eos_id
        for i in live:
            state = self._slots[i]
            reason = _advance(state.row, int(host[i]), eos, state.tracker, state.generated, state.budget)
            self._positions[i] += 1
            if reason is not None:
                finished.append((state.row, state.completion(reason)))
                self._slots[i] = None
                self._positions[i] = 0  # a free slot decodes garbage at position 0, never read
        if finished and not self.live:
            self._reset()
        return finished


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


def stream_rows(model: LoadedModel, rows: Sequence[Row], batch_size: int = 16) -> Iterator[tuple[int, Completion]]:
    """Decode `rows`, yielding (index into `rows`, completion) as each row finishes, so a caller
    can save every answer as soon as it exists.

    Up to `batch_size` rows decode at a time, shortest prompt first (less padding); as rows
    finish, waiting ones take their slots. A row's result does not depend on the others.
    """
    waiting = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt_ids))
    index = {id(row): i for i, row in enumerate(rows)}
    batch = DecodeBatch(model, batch_size)
    while waiting or batch.live:
        if waiting and batch.free:
            # Admit in groups (one prefill each), not one by one as single slots free up.
            if not batch.live or batch.free >= min(len(waiting), batch_size // 2):
                admitted, waiting = waiting[:batch.free], waiting[batch.free:]
                batch.admit([rows[i] for i in admitted])
        for row, completion in batch.step():
            yield index[id(row)], completion


def _in_order(count: int, stream: Iterator[tuple[int, Completion]]) -> list[Completion]:
    results: list[Completion | None] = [None] * count
    for i, completion in stream:
        results[i] = completion
    return results


def decode_rows(model: LoadedModel, rows: Sequence[Row], max_batch: int = 16) -> list[Completion]:
    """Decode every row (up to `max_batch` at a time, `stream_rows`) and return their
    completions in order."""
    return _in_order(len(rows), stream_rows(model, rows, max_batch))


def stream_completions(model: LoadedModel, prompts: Sequence[str], sampling: SamplingConfig = SamplingConfig(), *,
                       batch_size: int = 16) -> Iterator[tuple[int, Completion]]:
    """Complete already-formatted prompts, yielding (index into `prompts`, completion) as each
    finishes (`stream_rows`). Every prompt is checked against the context before any decodes."""
    rows = [Row(model.encode(p), sampling) for p in prompts]
    for row in rows:
        check_fits(row.prompt_ids, model.max_len)
    return stream_rows(model, rows, batch_size)


def generate(model: LoadedModel, prompts: list[str], sampling: SamplingConfig = SamplingConfig(), *,
             batch_size: int = 16) -> list[Completion]:
    """Complete already-formatted prompts (BOS added when the model was trained with it), in
    the order given (`stream_completions`, collected)."""
    return _in_order(len(prompts), stream_completions(model, prompts, sampling, batch_size=batch_size))
