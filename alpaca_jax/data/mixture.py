"""Training data from one or several sources, mixed by weight (Koala's recipe).

`data.train_files` is one source: its files in order, every example once per epoch, shuffled
by the batch iterator as before. `data.mixture` lists sources (Alpaca or conversation
JSON/JSONL files, or a `datasets` directory saved with `save_to_disk`), each with a weight.
An epoch then draws `data.mixture_size` examples (default: all sources' total), of which
source k gets exactly round(w_k / sum(w) * size) (largest remainder), interleaved in an order
shuffled by (seed, epoch). Within a source, examples come from an endless stream of its own
shuffles, seeded by (seed, source, pass), so an up-weighted small source is repeated only after
all of it has been seen and a down-weighted large one is seen further along each epoch.

The epoch's order is a pure function of (sizes, weights, size, seed, epoch): the batch
iterator's {epoch, index} state still resumes a run exactly. Exact quotas (not a multinomial
draw) make the realised proportions the configured ones up to rounding in every epoch.
Not for tokenizing (tokenize.py) or batching (dataset.py).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from alpaca_jax.data.chat import AlpacaTemplate, ChatTemplate, KoalaTemplate, VicunaTemplate
from alpaca_jax.data.conversations import Conversation, LoadReport, read_conversations
from alpaca_jax.data.records import DataError, resolve_data_path
from alpaca_jax.data.tokenize import TokenizeStats, tokenize_conversations

log = logging.getLogger("alpaca_jax")


@dataclasses.dataclass(frozen=True)
class Source:
    name: str                              # the file(s) it was read from
    weight: float                          # relative share of each epoch (mixtures only)
    conversations: list[Conversation]
    report: LoadReport


def _resolve(name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_dir() else resolve_data_path(name)


def load_sources(data_cfg) -> list[Source]:
    """The configured sources, loaded and validated (the report says what was skipped)."""
    specs = ([([s.path], s.weight, s.format) for s in data_cfg.mixture] if data_cfg.mixture
             else [(list(data_cfg.train_files), 1.0, data_cfg.format)])
    sources = []
    for files, weight, fmt in specs:
        name = ",".join(files)
        conversations, report = [], LoadReport()
        for file in files:
            convs, file_report = read_conversations(_resolve(file), fmt, data_cfg.on_malformed)
            conversations.extend(convs)
            report.add(file_report)
        report.conversations = len(conversations)
        if report.malformed:
            log.warning("data: %s: skipped %d malformed conversations %s (first: %s)", name,
                        sum(report.malformed.values()), dict(report.malformed),
                        "; ".join(report.malformed_where[:3]))
        sources.append(Source(name, weight, conversations, report))
    return sources


def corpus_texts(sources: Sequence[Source], template_name: str):
    """Text for training the run's BPE: every conversation rendered as it will be read, with
    the end-of-turn left out (EOS is a special token, added to the vocabulary apart)."""
    template = {"alpaca": AlpacaTemplate, "vicuna_v1.1": VicunaTemplate,
                "koala": KoalaTemplate}[template_name](eos_token="")
    for source in sources:
        for conv in source.conversations:
            yield template.render(conv).text


def quotas(weights: Sequence[float], total: int) -> np.ndarray:
    """Integer shares of `total` proportional to `weights` (largest remainder, ties by order)."""
    w = np.asarray(weights, np.float64)
    exact = w / w.sum() * total
    out = np.floor(exact).astype(np.int64)
    remainder = exact - out
    out[np.argsort(-remainder, kind="stable")[:total - int(out.sum())]] += 1
    return out


def _source_stream(size: int, seed: int, source: int, start: int, count: int) -> np.ndarray:
    """Items [start, start + count) of the source's endless concatenation of shuffles."""
    positions = np.arange(start, start + count)
    passes = positions // size
    out = np.empty(count, np.int64)
    for p in np.unique(passes):
        perm = np.random.default_rng([seed, 1, source, int(p)]).permutation(size)
        where = passes == p
        out[where] = perm[positions[where] % size]
    return out


@dataclasses.dataclass(frozen=True)
class MixtureOrder:
    """Callable epoch -> example indices (into the sources' concatenation) for that epoch."""
    sizes: tuple[int, ...]                 # kept examples per source
    weights: tuple[float, ...]             # configured weights
    total: int                             # examples per epoch
    seed: int

    def counts(self) -> np.ndarray:
        return quotas(self.weights, self.total)

    def __call__(self, epoch: int) -> np.ndarray:
        counts = self.counts()
        offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        labels = np.random.default_rng([self.seed, 2, epoch]).permutation(
            np.repeat(np.arange(len(counts)), counts))
        order = np.empty(self.total, np.int64)
        for k, n in enumerate(counts):
            picks = _source_stream(self.sizes[k], self.seed, k, epoch * int(n), int(n))
            order[labels == k] = offsets[k] + picks
        return order

    def realised(self, epoch: int = 0) -> list[float]:
        """Each source's share of the epoch's examples, as actually drawn."""
        order = self(epoch)
        bounds = np.cumsum(self.sizes)
        return (np.bincount(np.searchsorted(bounds, order, side="right"), minlength=len(self.sizes))
                / len(order)).tolist()


def tokenize_sources(sources: Sequence[Source], tokenizer, template: ChatTemplate, data_cfg, seed: int,
                     add_bos: bool = True):
    """(input_ids, loss_mask, epoch_order or None, stats, per-source summary) for the iterator."""
    input_ids, loss_mask, per_source, totals = [], [], [], None
    for source in sources:
        ids, masks, stats = tokenize_conversations(source.conversations, tokenizer, template,
                                                   data_cfg.max_len, add_bos, data_cfg.long_conversations)
        if stats.kept == 0:
            raise DataError(f"{source.name}: no example has a loss token within data.max_len={data_cfg.max_len}")
        input_ids.extend(ids)
        loss_mask.extend(masks)
        totals = stats if totals is None else TokenizeStats(
            *(a + b for a, b in zip(dataclasses.astuple(totals), dataclasses.astuple(stats))))
        per_source.append({"source": source.name, "weight": source.weight, "examples": stats.kept,
                           "load": source.report.as_dict(), "tokenize": dataclasses.asdict(stats)})
    order = None
    if data_cfg.mixture:
        sizes = tuple(p["examples"] for p in per_source)
        order = MixtureOrder(sizes, tuple(s.weight for s in sources),
                             data_cfg.mixture_size or sum(sizes), seed)
        for p, share, count in zip(per_source, order.realised(), order.counts()):
            p.update(realised_share=share, per_epoch=int(count))
            log.info("data mixture: %s weight %g: %d of %d examples per epoch, realised share %.2f%%",
                     p["source"], p["weight"], count, order.total, 100 * share)
    return input_ids, loss_mask, order, totals, per_source
