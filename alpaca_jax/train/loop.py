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
from alpaca_jax.data.conversations import read_conversations
from alpaca_jax.data.records import resolve_data_path
from alpaca_jax.data.split import split_sources
from alpaca_jax.data.tokenize import tokenize_conversations
from alpaca_jax.errors import UserError
from alpaca_jax.hf import load_pretrained, pretrained_tokenizer_dir
from alpaca_jax.model import Llama
from alpaca_jax.preflight import check_resume_config, check_train_outputs
from alpaca_jax.train import adapters
from alpaca_jax.train.evaluate import eval_batches, eval_step, mean_eval_loss
from alpaca_jax.train.loss import run_loss_chunk
from alpaca_jax.train.metrics import MetricsWriter
from alpaca_jax.train.optim import learning_rate_schedule, make_optimizer
from alpaca_jax.train.plan import parameter_report, plan_memory
from alpaca_jax.train.preemption import Interrupted, StopRequest
from alpaca_jax.train.state import TrainState, create_train_state, fresh_train_state, state_shardings
from alpaca_jax.train.step import train_step

log = logging.getLogger("alpaca_jax")


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (e.g. the loss became NaN); the message says why, in one line."""


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    steps: int
    first_loss: float
    last_loss: float
    state: object
    eval_loss: float | None = None   # mean held-out loss after the last step; None without a held-out set
    base: object = None              # LoRA: the frozen base the adapters were trained on


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """The tokenized held-out set (examples as the model sees them, cut to data.max_len)."""
    input_ids: list
    loss_mask: list
    stats: object                    # TokenizeStats of the held-out examples
    duplicates_dropped: int          # training examples dropped for equalling a held-out one
    conversations: list              # the held-out examples before tokenizing (Alpaca rows are one-exchange conversations)


def _eval_file_conversations(cfg: Config) -> list:
    conversations = []
    for name in cfg.data.eval_files:
        convs, _ = read_conversations(resolve_data_path(name), cfg.data.format, cfg.data.on_malformed)
        conversations.extend(convs)
    return conversations


def build_batches(cfg: Config, run_dir: Path):
    """Load, split, tokenize and set up the batch stream; returns (iterator, tokenizer, stats,
    sources, held_out), held_out being None when the config holds nothing out."""
    sources, held, duplicates = split_sources(load_sources(cfg.data), cfg.data.eval_fraction, cfg.train.seed,
                                              _eval_file_conversations(cfg))
    # The run's BPE is trained on the training text as the model will read it (templates
    # included, so their fixed preambles merge into a few tokens); held-out text stays unseen.
    corpus = lambda: corpus_texts(sources, cfg.data.template)  # noqa: E731
    if cfg.data.template == "tokenizer" and cfg.tokenizer.path is None:
        raise TrainingError("data.template=tokenizer needs tokenizer.path: a local HF tokenizer with a chat_template")
    if jax.process_count() > 1 and cfg.tokenizer.path is None:
        # One process trains and saves the run's BPE; the others load that very file.
        if jax.process_index() == 0:
            get_tokenizer(cfg.tokenizer, cfg.model.vocab_size, run_dir, corpus())
        multihost_utils.sync_global_devices("alpaca_jax:tokenizer")
    tokenizer = get_tokenizer(cfg.tokenizer, cfg.model.vocab_size, run_dir, corpus())
    template = chat_template(cfg.data.template, tokenizer)
    input_ids, loss_mask, order, stats, per_source = tokenize_sources(
        sources, tokenizer, template, cfg.data, cfg.train.seed, cfg.tokenizer.add_bos)
    iterator = BatchIterator(
        input_ids, _loss_masks(loss_mask, cfg.data.train_on_inputs), batch_size=cfg.train.batch_size,
        seq_len=cfg.data.max_len, seed=cfg.train.seed, num_epochs=cfg.train.num_epochs,
        pad_id=special_ids(tokenizer).pad, packing=cfg.data.packing,
        pack_window=cfg.data.pack_window, shard_index=jax.process_index(),
        shard_count=jax.process_count(), epoch_order=order)
    held_out = None
    if held is not None:
        ids, masks, held_stats = tokenize_conversations(held, tokenizer, template, cfg.data.max_len,
                                                        cfg.tokenizer.add_bos, cfg.data.long_conversations)
        if held_stats.kept == 0:
            raise TrainingError(f"no held-out example has a response token within data.max_len={cfg.data.max_len}")
        held_out = HeldOut(list(ids), list(masks), held_stats, duplicates, held)
    return iterator, tokenizer, stats, per_source, held_out


def _loss_masks(masks, train_on_inputs: bool):
    """The tokenizer's response-only masks, or with `data.train_on_inputs` every token (the
    prompt too, as Alpaca-LoRA's default). Position 0 is never a target either way."""
    return [np.ones_like(m) for m in masks] if train_on_inputs else masks


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
    """Step 0: random init, or `model.init_from` weights with a fresh optimizer state (with
    LoRA: fresh or `lora.init_from` adapters)."""
    if cfg.lora is not None:
        return jax.jit(lambda p: fresh_train_state(p, optimizer), out_shardings=shardings,
                       donate_argnums=0)(adapters.initial_adapters(cfg, shardings.params))
    if cfg.model.init_from is None:
        return create_train_state(cfg.model, optimizer, jax.random.key(cfg.train.seed), shardings)
    params = load_pretrained(cfg.model.init_from, cfg.model, shardings.params)
    log.info("initialised the model from %s", cfg.model.init_from)
    return jax.jit(lambda p: fresh_train_state(p, optimizer), out_shardings=shardings,
                   donate_argnums=0)(params)


def _abstract_state(cfg: Config, optimizer, shardings: TrainState) -> TrainState:
    """The state's shapes and placements, for restoring a checkpoint onto this mesh."""
    shapes = jax.eval_shape(lambda p: fresh_train_state(p, optimizer), adapters.trainable_layout(cfg)[0])
    return abstract_like(shapes, shardings)


def _extend_to_max_steps(iterator: BatchIterator, max_steps: int | None) -> int:
    """The run's length. `train.max_steps` overrides `train.num_epochs` as in HF Trainer: fewer
    steps cut the last epoch short, more steps add epochs (each a fresh shuffle) until covered."""
    if max_steps is None:
        return iterator.total_steps()
    planned = iterator.num_epochs
    while iterator.total_steps() < max_steps:
        iterator.num_epochs += 1
    if iterator.num_epochs > planned:
        log.info("train.max_steps=%d is more than train.num_epochs=%d cover; training %d epochs",
                 max_steps, planned, iterator.num_epochs)
    return max_steps


def _window_to_json(window: list[dict]) -> list[dict]:
    """Per-step metrics not yet logged, as JSON that restores to the same numpy values: a run
    stopped between log steps resumes its log window, and logs the same means bit for bit."""
    fetched = jax.device_get(window)
    return [{key: [np.asarray(value).item(), np.asarray(value).dtype.name] for key, value in m.items()}
            for m in fetched]


def _window_from_json(saved: list[dict]) -> list[dict]:
    return [{key: np.asarray(value, dtype) for key, (value, dtype) in m.items()} for m in saved]


def train(cfg: Config, devices=None) -> TrainResult:
    """Run (or resume) the configured training. SIGTERM or SIGINT (Ctrl-C) during the steps
    saves a checkpoint of the last finished step and raises `Interrupted`."""
    check_train_outputs(cfg)
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
    if resume_step is not None:
        check_resume_config(run_dir, cfg, resume_step, keep_old=is_main)
    mesh = sharding.make_mesh(cfg.mesh, devices)  # before the data: a bad mesh or batch fails fast
    sharding.check_batch_divides(cfg.train.batch_size, cfg.train.grad_accum, dict(mesh.shape), cfg.mesh.rules)

    iterator, tokenizer, stats, per_source, held_out = build_batches(cfg, run_dir)
    if is_main:  # after the data loaded: a run stopped by a bad row leaves no config behind
        save_config(cfg, run_dir / "config.yaml")
    total_steps = _extend_to_max_steps(iterator, cfg.train.max_steps)
    log.info("data: %d examples, %d kept, %d truncated to %d tokens, %d split, %d dropped (prompt too "
             "long); %d tokens, %d in the loss; packing efficiency %.1f%%; %d steps",
             stats.examples, stats.kept, stats.truncated, cfg.data.max_len, stats.split, stats.dropped,
             stats.tokens, stats.loss_tokens, 100 * iterator.packing_efficiency(), total_steps)

    rules = cfg.mesh.rules
    schedule = learning_rate_schedule(cfg.optimizer, total_steps)
    optimizer = make_optimizer(cfg.optimizer, schedule, adapters.trainable_layout(cfg)[1])
    shardings = state_shardings(cfg.model, optimizer, mesh, rules, cfg.lora)
    log.info("%s", parameter_report(plan_memory(cfg, len(mesh.devices.flat))))
    base, base_sh = None, None  # LoRA's frozen base: a step argument, never in the state
    if cfg.lora is not None:
        base_sh = adapters.base_shardings(cfg.model, cfg.lora, mesh, rules)
        base = adapters.frozen_base(cfg, base_sh)
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
    base_args = () if base is None else (base,)
    loss_chunk, loss_reason = run_loss_chunk(cfg, dict(mesh.shape))
    log.info("loss: %s", loss_reason)
    model = Llama(cfg.model, cfg.lora, sharding.attention_layout(mesh, rules))  # fused attention per device
    step_fn = jax.jit(
        functools.partial(train_step, model=model, optimizer=optimizer,
                          schedule=schedule, seed=cfg.train.seed, loss_chunk=loss_chunk),
        in_shardings=(shardings, batch_sh, *(() if base is None else (base_sh,))),
        out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)

    evaluate = _held_out_evaluator(cfg, held_out, mesh, shardings, batch_sh, tokenizer, base, base_sh, loss_chunk)
    writer = MetricsWriter(run_dir, cfg.run.tensorboard, enabled=is_main, append=resume_step is not None)
    summary = {"tokenize": dataclasses.asdict(stats), "sources": per_source,
               "packing_efficiency": iterator.packing_efficiency(),
               "total_steps": total_steps, "devices": len(mesh.devices.flat)}
    first_loss, last_loss = resumed.get("first_loss", math.nan), resumed.get("last_loss", math.nan)
    eval_loss = None
    window = _window_from_json(resumed.get("window", []))  # steps since the last log line
    tokens_seen, loss_tokens_seen = resumed.get("tokens_seen", 0), resumed.get("loss_tokens_seen", 0)
    start_step = resume_step or 0
    window_start = time.perf_counter()
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (cfg.train.progress_bar and is_main))
    stop = StopRequest.install()
    try:
        for step in range(start_step + 1, total_steps + 1):
            batch = _to_global(next(iterator), cfg.train.grad_accum, cfg.train.batch_size, batch_sh)
            state, metrics = step_fn(state, batch, *base_args)
            window.append(metrics)
            bar.update(1)
            # A checkpoint step is always a log step: the log window never spans a checkpoint,
            # so a resumed run logs exactly the records the uninterrupted one would.
            save_now = checkpoints.should_save(step, total_steps)
            # keep_best ranks checkpoints by eval loss, so a checkpoint step is then an eval step.
            eval_now = evaluate is not None and (
                step == total_steps or (save_now and cfg.checkpoint.keep_best)
                or (cfg.train.eval_every is not None and step % cfg.train.eval_every == 0))
            if step == 1 or step % cfg.train.log_every == 0 or step == total_steps or save_now or eval_now:
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
                if eval_now:
                    result = evaluate(state.params)
                    eval_loss = result.loss
                    record.update(eval_loss=result.loss, eval_perplexity=result.perplexity,
                                  eval_tokens=result.tokens)
                writer.write(record)
                bar.set_postfix(loss=f"{loss:.4f}")
                if step == 1:
                    first_loss = loss
                last_loss = loss
                window, window_start = [], time.perf_counter()
                if not math.isfinite(loss):
                    raise TrainingError(f"loss is {loss} at step {step}; stopping (try a lower "
                                        f"optimizer.learning_rate, or check the data)")
            stopping = stop.received is not None and step < total_steps
            if save_now or stopping:  # a stop between log steps also saves the unlogged window
                checkpoints.save(step, state, {"data": iterator.state(), "tokens_seen": tokens_seen,
                                               "loss_tokens_seen": loss_tokens_seen,
                                               "first_loss": first_loss, "last_loss": last_loss,
                                               "window": _window_to_json(window)},
                                 loss=last_loss if evaluate is None else eval_loss)
            else:
                checkpoints.raise_if_failed()
            if stopping:
                checkpoints.wait()
                raise Interrupted(f"stopped by {stop.name} after step {step} of {total_steps}; saved "
                                  f"{checkpoints.directory / str(step)}; rerun the same command to "
                                  f"resume", stop.received)
    finally:
        stop.restore()
        bar.close()
        writer.close()
    summary.update({"steps": total_steps, "first_loss": first_loss, "last_loss": last_loss})
    if held_out is not None:
        summary["eval"] = {"tokenize": dataclasses.asdict(held_out.stats), "eval_loss": eval_loss,
                           "train_duplicates_dropped": held_out.duplicates_dropped}
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("done: %d steps, loss %.4f -> %.4f; run dir %s", total_steps, first_loss, last_loss, run_dir)
    return TrainResult(run_dir=run_dir, steps=total_steps, first_loss=first_loss,
                       last_loss=last_loss, state=state, eval_loss=eval_loss, base=base)


def _held_out_evaluator(cfg: Config, held_out: HeldOut | None, mesh, shardings: TrainState, batch_sh,
                        tokenizer, base=None, base_sh=None, loss_chunk: int | None = None):
    """params -> EvalLoss over the whole held-out set, batched and placed like training; None
    without a held-out set."""
    if held_out is None:
        return None
    # Eval batches are training micro-batches, and the loss is chunked exactly when training's
    # is: eval never needs more activation memory than training.
    rows = cfg.train.batch_size // cfg.train.grad_accum
    batches = eval_batches(held_out.input_ids, held_out.loss_mask, batch_size=rows,
                           seq_len=cfg.data.max_len, pad_id=special_ids(tokenizer).pad,
                           packing=cfg.data.packing, pack_window=cfg.data.pack_window,
                           shard_index=jax.process_index(), shard_count=jax.process_count())
    model = Llama(cfg.model, cfg.lora, sharding.attention_layout(mesh, cfg.mesh.rules))
    step_fn = jax.jit(functools.partial(eval_step, model=model, loss_chunk=loss_chunk),
                      in_shardings=(shardings.params, batch_sh, *(() if base is None else (base_sh,))),
                      out_shardings=sharding.replicated(mesh))
    if base is not None:  # LoRA: the frozen base is an argument of every eval step too
        jitted = step_fn
        step_fn = lambda params, batch: jitted(params, batch, base)  # noqa: E731
    log.info("eval: %d held-out examples (%d response tokens) in %d batches; %d duplicate training "
             "rows dropped", held_out.stats.kept, held_out.stats.loss_tokens, len(batches),
             held_out.duplicates_dropped)
    place = functools.partial(_to_global, accum=1, global_batch=rows, batch_sh=batch_sh)
    return lambda params: mean_eval_loss(step_fn, params, batches, place, held_out.stats.kept)
