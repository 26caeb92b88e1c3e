"""The training loop: config -> data -> sharded train state -> jitted steps -> metrics.

`train(cfg)` is what `alpaca-jax train` and the notebooks call. It owns the side effects (run
directory, logs, progress bar); the math lives in `step.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from alpaca_jax import distributed, sharding
from alpaca_jax.checkpoint import Checkpointer, abstract_like, truncate_metrics
from alpaca_jax.config import Config, save_config
from alpaca_jax.data import (BatchIterator, chat_template, corpus_texts, get_tokenizer, load_sources, special_ids,
                             tokenize_sources)
from alpaca_jax.hf import load_pretrained, pretrained_tokenizer_dir
from alpaca_jax.model import Llama, logical_axes
from alpaca_jax.train.metrics import MetricsWriter
from alpaca_jax.train.optim import learning_rate_schedule, make_optimizer
from alpaca_jax.train.state import TrainState, create_train_state, fresh_train_state, state_shardings
from alpaca_jax.train.step import train_step

log = logging.getLogger("alpaca_jax")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss became NaN); the message says why, in one line."""


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    steps: int
    first_loss: float
    last_loss: float
    state: object


def build_batches(cfg: Config, run_dir: Path):
    """Load, tokenize and set up the batch stream; returns (iterator, tokenizer, stats, sources)."""
    sources = load_sources(cfg.data)
    # The run's BPE is trained on the text as the model will read it (templates included, so
    # their fixed preambles merge into a few tokens).
    corpus = lambda: corpus_texts(sources, cfg.data.template)  # noqa: E731
    if cfg.data.template == "tokenizer" and cfg.tokenizer.path is None:
        raise TrainingError("data.template=tokenizer needs tokenizer.path: a local HF tokenizer with a chat_template")
    if jax.process_count() > 1 and cfg.tokenizer.path is None:
        # One process trains and saves the run's BPE; the others load that very file.
        if jax.process_index() == 0:
            get_tokenizer(cfg.tokenizer, cfg.model.vocab_size, run_dir, corpus())
        multihost_utils.sync_global_devices("alpaca_jax:tokenizer")
    tokenizer = get_tokenizer(cfg.tokenizer, cfg.model.vocab_size, run_dir, corpus())
    input_ids, loss_mask, order, stats, per_source = tokenize_sources(
        sources, tokenizer, chat_template(cfg.data.template, tokenizer), cfg.data, cfg.train.seed,
        cfg.tokenizer.add_bos)
    iterator = BatchIterator(
        input_ids, loss_mask, batch_size=cfg.train.batch_size,
        seq_len=cfg.data.max_len, seed=cfg.train.seed, num_epochs=cfg.train.num_epochs,
        pad_id=special_ids(tokenizer).pad, packing=cfg.data.packing,
        pack_window=cfg.data.pack_window, shard_index=jax.process_index(),
        shard_count=jax.process_count(), epoch_order=order)
    return iterator, tokenizer, stats, per_source


def _to_global(batch: dict[str, np.ndarray], accum: int, global_batch: int, batch_sh):
    """Process-local [b, T] rows -> global [A, B/A, T] arrays placed on the mesh."""
    out = {}
    for key, local in batch.items():
        local = local.reshape(accum, local.shape[0] // accum, local.shape[1])
        global_shape = (accum, global_batch // accum, local.shape[2])
        out[key] = jax.make_array_from_process_local_data(batch_sh, local, global_shape)
    return out


def _with_pretrained_tokenizer(cfg: Config) -> Config:
    """`model.init_from` weights come with their tokenizer: use it unless one is configured."""
    if cfg.model.init_from is None or cfg.tokenizer.path is not None:
        return cfg
    tokenizer_dir = pretrained_tokenizer_dir(cfg.model.init_from)
    if tokenizer_dir is None:
        return cfg
    return dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=str(tokenizer_dir)))


def _initial_state(cfg: Config, optimizer, shardings: TrainState) -> TrainState:
    """Step 0: random init, or `model.init_from` weights with a fresh optimizer state."""
    if cfg.model.init_from is None:
        return create_train_state(cfg.model, optimizer, jax.random.key(cfg.train.seed), shardings)
    params = load_pretrained(cfg.model.init_from, cfg.model, shardings.params)
    log.info("initialised the model from %s", cfg.model.init_from)
    return jax.jit(lambda p: fresh_train_state(p, optimizer), out_shardings=shardings,
                   donate_argnums=0)(params)


def _abstract_state(cfg: Config, optimizer, shardings: TrainState) -> TrainState:
    """The state's shapes and placements, for restoring a checkpoint onto this mesh."""
    shapes = jax.eval_shape(lambda: create_train_state(cfg.model, optimizer, jax.random.key(0), shardings))
    return abstract_like(shapes, shardings)


def train(cfg: Config, devices=None) -> TrainResult:
    distributed.initialize(cfg.distributed)
    cfg = _with_pretrained_tokenizer(cfg)
    run_dir = cfg.run.path
    is_main = jax.process_index() == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpointer(run_dir, cfg.checkpoint)
    try:  # closed on every exit: an open manager's threads print tracebacks at interpreter exit
        return _train(cfg, devices, run_dir, is_main, checkpoints)
    finally:
        checkpoints.close()  # an async save in flight commits before we return


def _train(cfg: Config, devices, run_dir, is_main: bool, checkpoints: Checkpointer) -> TrainResult:
    resume_step = checkpoints.latest_step()
    if resume_step is not None and not cfg.train.resume:
        raise TrainingError(f"{run_dir} already has a checkpoint (step {resume_step}) and "
                            f"train.resume=false; choose another run.dir or allow resuming")
    if is_main:
        save_config(cfg, run_dir / "config.yaml")

    iterator, tokenizer, stats, per_source = build_batches(cfg, run_dir)
    total_steps = iterator.total_steps()
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    log.info("data: %d examples, %d kept, %d truncated to %d tokens, %d split, %d dropped (prompt too "
             "long); %d tokens, %d in the loss; packing efficiency %.1f%%; %d steps",
             stats.examples, stats.kept, stats.truncated, cfg.data.max_len, stats.split, stats.dropped,
             stats.tokens, stats.loss_tokens, 100 * iterator.packing_efficiency(), total_steps)

    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = cfg.mesh.rules
    schedule = learning_rate_schedule(cfg.optimizer, total_steps)
    optimizer = make_optimizer(cfg.optimizer, schedule, logical_axes(cfg.model))
    shardings = state_shardings(cfg.model, optimizer, mesh, rules)
    resumed: dict = {}
    if resume_step is None:
        state = _initial_state(cfg, optimizer, shardings)
    else:
        state, resumed = checkpoints.restore(resume_step, _abstract_state(cfg, optimizer, shardings))
        iterator.restore(resumed["data"])
        if is_main:
            truncate_metrics(run_dir, resume_step)  # the steps after it are about to be redone
        log.info("resumed from checkpoint %s (step %d of %d)", checkpoints.directory / str(resume_step),
                 resume_step, total_steps)
    batch_sh = sharding.batch_sharding(mesh, rules, leading=1)
    step_fn = jax.jit(
        functools.partial(train_step, model=Llama(cfg.model), optimizer=optimizer, schedule=schedule),
        in_shardings=(shardings, batch_sh), out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0)

    writer = MetricsWriter(run_dir, cfg.run.tensorboard, enabled=is_main, append=resume_step is not None)
    summary = {"tokenize": dataclasses.asdict(stats), "sources": per_source,
               "packing_efficiency": iterator.packing_efficiency(),
               "total_steps": total_steps, "devices": len(mesh.devices.flat)}
    first_loss, last_loss = resumed.get("first_loss", math.nan), resumed.get("last_loss", math.nan)
    window: list[dict] = []
    tokens_seen, loss_tokens_seen = resumed.get("tokens_seen", 0), resumed.get("loss_tokens_seen", 0)
    start_step = resume_step or 0
    window_start = time.perf_counter()
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (cfg.train.progress_bar and is_main))
    try:
        for step in range(start_step + 1, total_steps + 1):
            batch = _to_global(next(iterator), cfg.train.grad_accum, cfg.train.batch_size, batch_sh)
            state, metrics = step_fn(state, batch)
            window.append(metrics)
            bar.update(1)
            # A checkpoint step is always a log step: the log window never spans a checkpoint,
            # so a resumed run logs exactly the records the uninterrupted one would.
            save_now = checkpoints.should_save(step, total_steps)
            if step == 1 or step % cfg.train.log_every == 0 or step == total_steps or save_now:
                fetched = jax.device_get(window)
                elapsed = time.perf_counter() - window_start
                window_tokens = int(sum(m["tokens"] for m in fetched))
                tokens_seen += window_tokens
                loss_tokens_seen += int(sum(m["loss_tokens"] for m in fetched))
                loss = float(np.mean([m["loss"] for m in fetched]))
                record = {
                    "step": step,
                    "epoch": iterator.epoch,
                    "loss": loss,
                    "learning_rate": float(fetched[-1]["learning_rate"]),
                    "grad_norm": float(fetched[-1]["grad_norm"]),
                    "tokens_seen": tokens_seen,
                    "loss_tokens_seen": loss_tokens_seen,
                    "tokens_per_second": window_tokens / elapsed,
                }
                writer.write(record)
                bar.set_postfix(loss=f"{loss:.4f}")
                if step == 1:
                    first_loss = loss
                last_loss = loss
                window, window_start = [], time.perf_counter()
                if not math.isfinite(loss):
                    raise TrainingError(f"loss is {loss} at step {step}; stopping (try a lower "
                                        f"optimizer.learning_rate, or check the data)")
            if save_now:
                checkpoints.save(step, state, {"data": iterator.state(), "tokens_seen": tokens_seen,
                                               "loss_tokens_seen": loss_tokens_seen,
                                               "first_loss": first_loss, "last_loss": last_loss},
                                 loss=last_loss)
    finally:
        bar.close()
        writer.close()
    summary.update({"steps": total_steps, "first_loss": first_loss, "last_loss": last_loss})
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("done: %d steps, loss %.4f -> %.4f; run dir %s", total_steps, first_loss, last_loss, run_dir)
    return TrainResult(run_dir=run_dir, steps=total_steps, first_loss=first_loss,
                       last_loss=last_loss, state=state)
