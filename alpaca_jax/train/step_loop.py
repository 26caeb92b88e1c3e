"""The loop over training steps that both trainers run: SFT (loop.py) and preference tuning
(preference_loop.py).

What they share is everything around the step itself: the run directory and its checkpointer,
resuming (the iterator's position, the counters, the unlogged window), the log window and its
metrics.jsonl records, held-out evaluation on log steps, checkpoints, SIGTERM/SIGINT (save the
last finished step, then stop), and a NaN loss stopping the run. What differs is passed in: the
jitted step, how a window of per-step metrics becomes a record (`summarize`) and what a
held-out evaluation reports (`evaluate`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from alpaca_jax import distributed
from alpaca_jax.checkpoint import Checkpointer, abstract_like, truncate_metrics
from alpaca_jax.config import Config
from alpaca_jax.errors import UserError
from alpaca_jax.hf import load_pretrained, pretrained_tokenizer_dir
from alpaca_jax.preflight import check_resume_config, check_train_outputs
from alpaca_jax.train import adapters
from alpaca_jax.train.metrics import MetricsWriter
from alpaca_jax.train.preemption import Interrupted, StopRequest
from alpaca_jax.train.state import TrainState, create_train_state, fresh_train_state

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


# -- starting or resuming a run ------------------------------------------------------------------

def with_pretrained_tokenizer(cfg: Config) -> Config:
    """`model.init_from` weights come with their tokenizer: use it unless one is configured."""
    if cfg.model.init_from is None or cfg.tokenizer.path is not None:
        return cfg
    tokenizer_dir = pretrained_tokenizer_dir(cfg.model.init_from)
    if tokenizer_dir is None:
        return cfg
    return dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=str(tokenizer_dir)))


def run_in_directory(cfg: Config, body: Callable) -> object:
    """The checks and set-up every trainer starts with, then `body(cfg, run_dir, is_main,
    checkpoints, resume_step)`; the checkpointer is closed on every exit (an open manager's
    threads print tracebacks at interpreter exit; an async save in flight commits first)."""
    check_train_outputs(cfg)
    distributed.initialize(cfg.distributed)
    cfg = with_pretrained_tokenizer(cfg)
    run_dir = cfg.run.path
    is_main = jax.process_index() == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpointer(run_dir, cfg.checkpoint)
    try:
        resume_step = checkpoints.latest_step()
        if resume_step is not None and not cfg.train.resume:
            raise TrainingError(f"{run_dir} already has a checkpoint (step {resume_step}) and "
                                f"train.resume=false; choose another run.dir or allow resuming")
        if resume_step is not None:
            check_resume_config(run_dir, cfg, resume_step, keep_old=is_main)
        return body(cfg, run_dir, is_main, checkpoints, resume_step)
    finally:
        checkpoints.close()


def initial_state(cfg: Config, optimizer, shardings: TrainState) -> TrainState:
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


def abstract_state(cfg: Config, optimizer, shardings: TrainState) -> TrainState:
    """The state's shapes and placements, for restoring a checkpoint onto this mesh."""
    shapes = jax.eval_shape(lambda p: fresh_train_state(p, optimizer), adapters.trainable_layout(cfg)[0])
    return abstract_like(shapes, shardings)


def start_or_resume(cfg: Config, optimizer, shardings: TrainState, checkpoints: Checkpointer,
                    resume_step: int | None, iterator, run_dir: Path, is_main: bool,
                    total_steps: int) -> tuple[TrainState, dict]:
    """(state, what the checkpoint carried besides the state: {} for a fresh run). Resuming puts
    the iterator where it was and cuts metrics.jsonl back to the checkpoint's step."""
    if resume_step is None:
        return initial_state(cfg, optimizer, shardings), {}
    state, resumed = checkpoints.restore(resume_step, abstract_state(cfg, optimizer, shardings))
    iterator.restore(resumed["data"])
    if is_main:
        truncate_metrics(run_dir, resume_step)  # the steps after it are about to be redone
    log.info("resumed from checkpoint %s (step %d of %d)", checkpoints.directory / str(resume_step),
             resume_step, total_steps)
    return state, resumed


def extend_to_max_steps(iterator, max_steps: int | None) -> int:
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


def to_global(batch: dict[str, np.ndarray], accum: int, global_batch: int, batch_sh):
    """Process-local [b, T] rows -> global [A, B/A, T] arrays placed on the mesh."""
    out = {}
    for key, local in batch.items():
        local = local.reshape(accum, local.shape[0] // accum, local.shape[1])
        global_shape = (accum, global_batch // accum, local.shape[2])
        out[key] = jax.make_array_from_process_local_data(batch_sh, local, global_shape)
    return out


# -- the steps ------------------------------------------------------------------------------------

def window_to_json(window: list[dict]) -> list[dict]:
    """Per-step metrics not yet logged, as JSON that restores to the same numpy values: a run
    stopped between log steps resumes its log window, and logs the same means bit for bit."""
    fetched = jax.device_get(window)
    return [{key: [np.asarray(value).item(), np.asarray(value).dtype.name] for key, value in m.items()}
            for m in fetched]


def window_from_json(saved: list[dict]) -> list[dict]:
    return [{key: np.asarray(value, dtype) for key, (value, dtype) in m.items()} for m in saved]


@dataclasses.dataclass(frozen=True)
class StepRecipe:
    """What differs between the trainers' loops.

    summarize(fetched window) -> (record fields, per-window counts): the fields follow "step" and
      "epoch" in the record (a NaN "loss" stops the run); each count is added to a running total
      of that name, written after the fields and kept in checkpoints. "tokens_seen" is required:
      the window's tokens per second come from it.
    evaluate(params) -> eval_* fields, "eval_loss" among them (it ranks checkpoints for
      checkpoint.keep_best); None without held-out data.
    """
    step_fn: Callable                  # (state, batch, *step_args) -> (state, per-step metrics)
    step_args: tuple
    summarize: Callable[[list[dict]], tuple[dict, dict[str, int]]]
    counters: tuple[str, ...]
    evaluate: Callable[[object], dict] | None
    progress_label: str


@dataclasses.dataclass
class StepsResult:
    state: object
    first_loss: float
    last_loss: float
    eval_record: dict                  # the last held-out evaluation's fields ({} if none ran)


def run_steps(cfg: Config, recipe: StepRecipe, state, iterator, batch_sh, checkpoints: Checkpointer,
              writer: MetricsWriter, total_steps: int, resume_step: int | None, resumed: dict,
              is_main: bool) -> StepsResult:
    """Steps resume_step+1 .. total_steps. SIGTERM or SIGINT (Ctrl-C) saves a checkpoint of the
    last finished step (with the not-yet-logged window) and raises `Interrupted`."""
    first_loss, last_loss = resumed.get("first_loss", math.nan), resumed.get("last_loss", math.nan)
    counts = {name: resumed.get(name, 0) for name in recipe.counters}
    window = window_from_json(resumed.get("window", []))  # steps since the last log line
    eval_record: dict = {}
    start_step = resume_step or 0
    window_start = time.perf_counter()
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=start_step, desc=recipe.progress_label, unit="step", dynamic_ncols=True,
               disable=not (cfg.train.progress_bar and is_main))
    stop = StopRequest.install()
    try:
        for step in range(start_step + 1, total_steps + 1):
            batch = to_global(next(iterator), cfg.train.grad_accum, cfg.train.batch_size, batch_sh)
            state, metrics = recipe.step_fn(state, batch, *recipe.step_args)
            window.append(metrics)
            bar.update(1)
            # A checkpoint step is always a log step: the log window never spans a checkpoint,
            # so a resumed run logs exactly the records the uninterrupted one would.
            save_now = checkpoints.should_save(step, total_steps)
            # keep_best ranks checkpoints by eval loss, so a checkpoint step is then an eval step.
            eval_now = recipe.evaluate is not None and (
                step == total_steps or (save_now and cfg.checkpoint.keep_best)
                or (cfg.train.eval_every is not None and step % cfg.train.eval_every == 0))
            if step == 1 or step % cfg.train.log_every == 0 or step == total_steps or save_now or eval_now:
                fields, window_counts = recipe.summarize(jax.device_get(window))
                elapsed = time.perf_counter() - window_start
                for name in recipe.counters:
                    counts[name] += window_counts[name]
                record = {"step": step, "epoch": iterator.epoch, **fields, **counts,
                          "tokens_per_second": window_counts["tokens_seen"] / elapsed}
                if eval_now:
                    eval_record = recipe.evaluate(state.params)
                    record.update(eval_record)
                writer.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if step == 1:
                    first_loss = record["loss"]
                last_loss = record["loss"]
                window, window_start = [], time.perf_counter()
                if not math.isfinite(last_loss):
                    raise TrainingError(f"loss is {last_loss} at step {step}; stopping (try a lower "
                                        f"optimizer.learning_rate, or check the data)")
            stopping = stop.received is not None and step < total_steps
            if save_now or stopping:  # a stop between log steps also saves the unlogged window
                checkpoints.save(step, state, {"data": iterator.state(), **counts, "first_loss": first_loss,
                                               "last_loss": last_loss, "window": window_to_json(window)},
                                 loss=last_loss if recipe.evaluate is None else eval_record.get("eval_loss"))
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
    return StepsResult(state, first_loss, last_loss, eval_record)
