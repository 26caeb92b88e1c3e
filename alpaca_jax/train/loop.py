"""The training loop: config -> data -> sharded train state -> jitted steps -> metrics.

`train(cfg)` is what `alpaca-jax train` and the notebooks call. It owns the side effects (run
directory, logs, progress bar); the math lives in `step.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from alpaca_jax import sharding
from alpaca_jax.checkpoint import Checkpointer
from alpaca_jax.config import Config, save_config
from alpaca_jax.data import (BatchIterator, chat_template, corpus_texts, get_tokenizer, load_sources, special_ids,
                             tokenize_sources)
from alpaca_jax.data.conversations import read_conversations
from alpaca_jax.data.records import resolve_data_path
from alpaca_jax.data.split import split_sources
from alpaca_jax.data.tokenize import tokenize_conversations
from alpaca_jax.model import Llama
from alpaca_jax.train import adapters
from alpaca_jax.train.evaluate import eval_batches, eval_step, mean_eval_loss
from alpaca_jax.train.loss import run_loss_chunk
from alpaca_jax.train.metrics import MetricsWriter
from alpaca_jax.train.optim import learning_rate_schedule, make_optimizer
from alpaca_jax.train.plan import parameter_report, plan_memory
from alpaca_jax.train.state import TrainState, state_shardings
from alpaca_jax.train.step import train_step
from alpaca_jax.train.step_loop import (StepRecipe, TrainingError, TrainResult, extend_to_max_steps,
                                        run_in_directory, run_steps, start_or_resume, to_global)

log = logging.getLogger("alpaca_jax")


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


def train(cfg: Config, devices=None) -> TrainResult:
    """Run (or resume) the configured training. SIGTERM or SIGINT (Ctrl-C) during the steps
    saves a checkpoint of the last finished step and raises `Interrupted`."""
    return run_in_directory(cfg, functools.partial(_train, devices=devices))


def _summarize(fetched: list[dict]) -> tuple[dict, dict[str, int]]:
    """A metrics.jsonl record's fields from the steps since the last: the mean loss per step."""
    fields = {"loss": float(np.mean([m["loss"] for m in fetched])),
              "learning_rate": float(fetched[-1]["learning_rate"]), "grad_norm": float(fetched[-1]["grad_norm"])}
    return fields, {"tokens_seen": int(sum(m["tokens"] for m in fetched)),
                    "loss_tokens_seen": int(sum(m["loss_tokens"] for m in fetched))}


def _train(cfg: Config, run_dir: Path, is_main: bool, checkpoints: Checkpointer, resume_step: int | None,
           devices=None) -> TrainResult:
    mesh = sharding.make_mesh(cfg.mesh, devices)  # before the data: a bad mesh or batch fails fast
    sharding.check_batch_divides(cfg.train.batch_size, cfg.train.grad_accum, dict(mesh.shape), cfg.mesh.rules)

    iterator, tokenizer, stats, per_source, held_out = build_batches(cfg, run_dir)
    if is_main:  # after the data loaded: a run stopped by a bad row leaves no config behind
        save_config(cfg, run_dir / "config.yaml")
    total_steps = extend_to_max_steps(iterator, cfg.train.max_steps)
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
    state, resumed = start_or_resume(cfg, optimizer, shardings, checkpoints, resume_step, iterator, run_dir,
                                     is_main, total_steps)
    batch_sh = sharding.batch_sharding(mesh, rules, leading=1)
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
    recipe = StepRecipe(step_fn=step_fn, step_args=() if base is None else (base,), summarize=_summarize,
                        counters=("tokens_seen", "loss_tokens_seen"),
                        evaluate=None if evaluate is None else functools.partial(_eval_fields, evaluate),
                        progress_label="train")
    done = run_steps(cfg, recipe, state, iterator, batch_sh, checkpoints, writer, total_steps, resume_step,
                     resumed, is_main)
    eval_loss = done.eval_record.get("eval_loss")
    summary.update({"steps": total_steps, "first_loss": done.first_loss, "last_loss": done.last_loss})
    if held_out is not None:
        summary["eval"] = {"tokenize": dataclasses.asdict(held_out.stats), "eval_loss": eval_loss,
                           "train_duplicates_dropped": held_out.duplicates_dropped}
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("done: %d steps, loss %.4f -> %.4f; run dir %s", total_steps, done.first_loss, done.last_loss, run_dir)
    return TrainResult(run_dir=run_dir, steps=total_steps, first_loss=done.first_loss,
                       last_loss=done.last_loss, state=done.state, eval_loss=eval_loss, base=base)


def _eval_fields(evaluate, params) -> dict:
    result = evaluate(params)
    return {"eval_loss": result.loss, "eval_perplexity": result.perplexity, "eval_tokens": result.tokens}


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
    place = functools.partial(to_global, accum=1, global_batch=rows, batch_sh=batch_sh)
    return lambda params: mean_eval_loss(step_fn, params, batches, place, held_out.stats.kept)
