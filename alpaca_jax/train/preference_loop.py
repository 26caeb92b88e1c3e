"""The preference-tuning loop (DPO and kin): `alpaca-jax train` with a `preference:` section.

Same run directory, mesh, sharding, optimizer, LoRA/QLoRA, checkpoints and exact resume as the
SFT loop (loop.py, whose helpers it reuses); what differs is the data (pairs, packed side by
side: data/preference_batches.py), the step (preference_step.py) and the reference model:
- `preference.reference: null` with LoRA: the base with the adapters off (no extra memory);
- `preference.reference: null` without LoRA: a frozen copy of the starting weights;
- a path: those weights (HF dir, import-hf output or run dir), frozen.
With `preference.precompute_reference` one pass scores every pair with the reference before the
first step; the reference weights (other than a LoRA base, which the policy needs anyway) are
then released, and batches carry the stored log-probs.

metrics.jsonl records TRL's names (rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected) averaged over the steps since the last record,
and the same over the held-out pairs as eval_*.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from alpaca_jax import distributed, sharding
from alpaca_jax.checkpoint import Checkpointer, truncate_metrics
from alpaca_jax.config import Config, save_config
from alpaca_jax.data import corpus_texts, get_tokenizer, special_ids
from alpaca_jax.data.chat import chat_template
from alpaca_jax.data.conversations import LoadReport
from alpaca_jax.data.mixture import Source
from alpaca_jax.data.preference import read_pairs
from alpaca_jax.data.preference_batches import PairBatchIterator, TokenizedPairs, pair_slots, tokenize_pairs
from alpaca_jax.data.records import resolve_data_path
from alpaca_jax.data.split import held_out_split
from alpaca_jax.hf import load_pretrained
from alpaca_jax.model import Llama
from alpaca_jax.model.params import init_params, logical_axes, param_shapes
from alpaca_jax.preflight import check_resume_config, check_train_outputs
from alpaca_jax.train import adapters
from alpaca_jax.train.loop import (TrainingError, TrainResult, _abstract_state, _extend_to_max_steps,
                                   _initial_state, _to_global, _with_pretrained_tokenizer)
from alpaca_jax.train.loss import run_loss_chunk
from alpaca_jax.train.metrics import MetricsWriter
from alpaca_jax.train.optim import learning_rate_schedule, make_optimizer
from alpaca_jax.train.preemption import Interrupted, StopRequest
from alpaca_jax.train.preference_loss import METRIC_NAMES
from alpaca_jax.train.preference_step import preference_eval_step, preference_train_step, reference_step
from alpaca_jax.train.state import state_shardings

log = logging.getLogger("alpaca_jax")


@dataclasses.dataclass(frozen=True)
class PairData:
    train: TokenizedPairs
    held_out: TokenizedPairs | None
    report: LoadReport
    tokenizer: object


def _read(cfg: Config, files) -> tuple[list, LoadReport]:
    pairs, report = [], LoadReport()
    for name in files:
        file_pairs, file_report = read_pairs(resolve_data_path(name), cfg.data.on_malformed)
        pairs.extend(file_pairs)
        report.add(file_report)
    report.conversations = len(pairs)
    return pairs, report


def load_pair_data(cfg: Config, run_dir: Path) -> PairData:
    """Read, split, tokenize: the training and held-out pairs, and the run's tokenizer."""
    pairs, report = _read(cfg, cfg.data.train_files)
    if report.malformed:
        log.warning("data: skipped %d malformed preference pairs %s (first: %s)", sum(report.malformed.values()),
                    dict(report.malformed), "; ".join(report.malformed_where[:3]))
    eval_pairs, _ = _read(cfg, cfg.data.eval_files)
    key = lambda p: (p.prompt.turns, p.chosen, p.rejected)  # noqa: E731
    split = held_out_split(pairs, cfg.data.eval_fraction, cfg.train.seed, eval_pairs, key=key)
    conversations = [p.conversation(a) for p in split.train for a in (p.chosen, p.rejected)]
    if cfg.data.template == "tokenizer" and cfg.tokenizer.path is None:
        raise TrainingError("data.template=tokenizer needs tokenizer.path: a local HF tokenizer with a chat_template")
    corpus = corpus_texts([Source("pairs", 1.0, conversations, report)], cfg.data.template) \
        if cfg.tokenizer.path is None else ()
    # A BPE trained here is saved into the run dir only once the pairs are known to be usable:
    # a run stopped by bad data leaves nothing behind.
    fresh = cfg.tokenizer.path is None and not (run_dir / "tokenizer" / "tokenizer.json").is_file()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = get_tokenizer(cfg.tokenizer, cfg.model.vocab_size, Path(scratch) if fresh else run_dir, corpus)
    template = chat_template(cfg.data.template, tokenizer)
    tokenize = lambda p: tokenize_pairs(p, tokenizer, template, cfg.data.max_len, cfg.tokenizer.add_bos)  # noqa: E731
    train = tokenize(split.train)
    if train.stats.kept == 0:
        raise TrainingError(f"no preference pair has a response token on both sides within "
                            f"data.max_len={cfg.data.max_len}")
    held = tokenize(split.eval) if split.eval else None
    if held is not None and held.stats.kept == 0:
        raise TrainingError(f"no held-out pair has a response token on both sides within data.max_len={cfg.data.max_len}")
    if fresh and jax.process_index() == 0:
        tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    return PairData(train, held, report, tokenizer)


def _frozen(cfg: Config, mesh, base, base_sh) -> tuple[dict, dict]:
    """(frozen arrays, their shardings): the LoRA base and/or the reference weights."""
    frozen, frozen_sh = {}, {}
    if base is not None:
        frozen["base"], frozen_sh["base"] = base, base_sh
    if cfg.lora is not None and cfg.preference.reference is None:
        return frozen, frozen_sh  # the base with adapters off is the reference
    full_sh = sharding.tree_shardings(logical_axes(cfg.model), param_shapes(cfg.model), mesh, cfg.mesh.rules)
    source = cfg.preference.reference or cfg.model.init_from
    if source is not None:
        frozen["reference"] = load_pretrained(source, cfg.model, full_sh)
    else:  # the random init of train.seed: the very weights full fine-tuning starts from
        frozen["reference"] = jax.jit(lambda k: init_params(cfg.model, k), out_shardings=full_sh)(
            jax.random.key(cfg.train.seed))
    frozen_sh["reference"] = full_sh
    return frozen, frozen_sh


def _pair_batches(cfg: Config, pairs: TokenizedPairs, pad_id: int, slots: int, reference=None,
                  **kwargs) -> PairBatchIterator:
    return PairBatchIterator(pairs, reference=reference, slots=slots, seq_len=2 * cfg.data.max_len, pad_id=pad_id,
                             packing=cfg.data.packing, pack_window=cfg.data.pack_window,
                             shard_index=jax.process_index(), shard_count=jax.process_count(), **kwargs)


def precompute_reference(cfg: Config, pairs: TokenizedPairs, step_fn, frozen, place, pad_id: int, slots: int,
                         rows: int) -> np.ndarray:
    """[N, 2] reference sequence log-probs (chosen, rejected) of every pair, in one pass."""
    batches = _pair_batches(cfg, pairs, pad_id, slots, batch_size=rows, seed=0, num_epochs=1)
    plan = batches.epoch_rows(0)
    out = np.zeros((len(pairs), 2), np.float32)
    results = [step_fn(frozen, place(batch)) for batch in batches]
    for index, logps in enumerate(jax.device_get(results)):
        for r, row in enumerate(plan[index * rows:(index + 1) * rows]):
            out[row] = np.asarray(logps[r, :2 * len(row)]).reshape(-1, 2)
    return out


def _evaluate(step_fn, params, batches, place) -> dict[str, float]:
    """eval_loss and eval_<metric> means over every held-out pair."""
    sums = jax.device_get([step_fn(params, place(b)) for b in batches])
    pairs = max(sum(float(s["pairs"]) for s in sums), 1.0)
    totals = {k: sum(float(s[k]) for s in sums) / pairs for k in ("loss", *METRIC_NAMES)}
    return {f"eval_{k}": v for k, v in totals.items()} | {"eval_pairs": int(pairs)}


def train_preference(cfg: Config, devices=None) -> TrainResult:
    """Run (or resume) the configured preference tuning."""
    check_train_outputs(cfg)
    distributed.initialize(cfg.distributed)
    cfg = _with_pretrained_tokenizer(cfg)
    run_dir = cfg.run.path
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpointer(run_dir, cfg.checkpoint)
    try:
        return _train(cfg, devices, run_dir, jax.process_index() == 0, checkpoints)
    finally:
        checkpoints.close()


def _train(cfg: Config, devices, run_dir: Path, is_main: bool, checkpoints: Checkpointer) -> TrainResult:
    resume_step = checkpoints.latest_step()
    if resume_step is not None and not cfg.train.resume:
        raise TrainingError(f"{run_dir} already has a checkpoint (step {resume_step}) and "
                            f"train.resume=false; choose another run.dir or allow resuming")
    if resume_step is not None:
        check_resume_config(run_dir, cfg, resume_step, keep_old=is_main)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.check_batch_divides(cfg.train.batch_size, cfg.train.grad_accum, dict(mesh.shape), cfg.mesh.rules)
    data = load_pair_data(cfg, run_dir)
    if is_main:
        save_config(cfg, run_dir / "config.yaml")
    pad_id = special_ids(data.tokenizer).pad
    seq_len = 2 * cfg.data.max_len
    slots = max(pair_slots(data.train, seq_len, cfg.data.packing),
                pair_slots(data.held_out, seq_len, cfg.data.packing) if data.held_out else 1)
    rows = cfg.train.batch_size // cfg.train.grad_accum

    rules = cfg.mesh.rules
    batch_sh = sharding.batch_sharding(mesh, rules, leading=1)
    base, base_sh = None, None
    if cfg.lora is not None:
        base_sh = adapters.base_shardings(cfg.model, cfg.lora, mesh, rules)
        base = adapters.frozen_base(cfg, base_sh)
    frozen, frozen_sh = _frozen(cfg, mesh, base, base_sh)
    loss_chunk, loss_reason = run_loss_chunk(dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, max_len=seq_len)), dict(mesh.shape))
    log.info("loss: %s", loss_reason)
    model, ref_model = Llama(cfg.model, cfg.lora), Llama(cfg.model, None)
    place = functools.partial(_to_global, accum=1, global_batch=rows, batch_sh=batch_sh)

    references = {"train": None, "eval": None}
    if cfg.preference.precompute_reference:
        ref_fn = jax.jit(functools.partial(reference_step, ref_model=ref_model, slots=slots, loss_chunk=loss_chunk),
                         in_shardings=(frozen_sh, batch_sh), out_shardings=sharding.replicated(mesh))
        references["train"] = precompute_reference(cfg, data.train, ref_fn, frozen, place, pad_id, slots, rows)
        if data.held_out is not None:
            references["eval"] = precompute_reference(cfg, data.held_out, ref_fn, frozen, place, pad_id, slots, rows)
        frozen.pop("reference", None), frozen_sh.pop("reference", None)  # not held during training
        log.info("reference: precomputed the log-probs of %d pairs", len(data.train))

    iterator = _pair_batches(cfg, data.train, pad_id, slots, references["train"], batch_size=cfg.train.batch_size,
                             seed=cfg.train.seed, num_epochs=cfg.train.num_epochs)
    total_steps = _extend_to_max_steps(iterator, cfg.train.max_steps)
    stats = data.train.stats
    log.info("data: %d pairs, %d kept, %d sequences truncated to %d tokens, %d dropped (no response token); "
             "%d tokens, %d scored; packing efficiency %.1f%%; %d steps", stats.pairs, stats.kept,
             stats.truncated, cfg.data.max_len, stats.dropped, stats.tokens, stats.response_tokens,
             100 * iterator.packing_efficiency(), total_steps)

    schedule = learning_rate_schedule(cfg.optimizer, total_steps)
    optimizer = make_optimizer(cfg.optimizer, schedule, adapters.trainable_layout(cfg)[1])
    shardings = state_shardings(cfg.model, optimizer, mesh, rules, cfg.lora)
    resumed: dict = {}
    if resume_step is None:
        state = _initial_state(cfg, optimizer, shardings)
    else:
        state, resumed = checkpoints.restore(resume_step, _abstract_state(cfg, optimizer, shardings))
        iterator.restore(resumed["data"])
        if is_main:
            truncate_metrics(run_dir, resume_step)
        log.info("resumed from checkpoint %s (step %d of %d)", checkpoints.directory / str(resume_step),
                 resume_step, total_steps)
    common = dict(model=model, ref_model=ref_model, cfg=cfg.preference, slots=slots, loss_chunk=loss_chunk)
    step_fn = jax.jit(functools.partial(preference_train_step, optimizer=optimizer, schedule=schedule,
                                        seed=cfg.train.seed, **common),
                      in_shardings=(shardings, batch_sh, frozen_sh),
                      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    evaluate = None
    if data.held_out is not None:
        eval_fn = jax.jit(functools.partial(preference_eval_step, **common),
                          in_shardings=(shardings.params, batch_sh, frozen_sh), out_shardings=sharding.replicated(mesh))
        eval_batches = list(_pair_batches(cfg, data.held_out, pad_id, slots, references["eval"], batch_size=rows,
                                          seed=0, num_epochs=1))
        evaluate = lambda params: _evaluate(lambda p, b: eval_fn(p, b, frozen), params, eval_batches, place)  # noqa: E731

    writer = MetricsWriter(run_dir, cfg.run.tensorboard, enabled=is_main, append=resume_step is not None)
    first_loss, last_loss = resumed.get("first_loss", math.nan), resumed.get("last_loss", math.nan)
    eval_record: dict = {}
    window: list = []
    tokens_seen = resumed.get("tokens_seen", 0)
    start_step = resume_step or 0
    window_start = time.perf_counter()
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=start_step, desc="dpo", unit="step", dynamic_ncols=True,
               disable=not (cfg.train.progress_bar and is_main))
    stop = StopRequest.install()
    try:
        for step in range(start_step + 1, total_steps + 1):
            batch = _to_global(next(iterator), cfg.train.grad_accum, cfg.train.batch_size, batch_sh)
            state, metrics = step_fn(state, batch, frozen)
            window.append(metrics)
            bar.update(1)
            save_now = checkpoints.should_save(step, total_steps)
            eval_now = evaluate is not None and (
                step == total_steps or (save_now and cfg.checkpoint.keep_best)
                or (cfg.train.eval_every is not None and step % cfg.train.eval_every == 0))
            stopping = stop.received is not None and step < total_steps
            if step == 1 or step % cfg.train.log_every == 0 or step == total_steps or save_now or eval_now or stopping:
                record, window_tokens = _record(step, iterator.epoch, jax.device_get(window))
                tokens_seen += window_tokens
                record.update(tokens_seen=tokens_seen, tokens_per_second=window_tokens / (time.perf_counter() - window_start))
                if eval_now:
                    eval_record = evaluate(state.params)
                    record.update(eval_record)
                writer.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                first_loss = record["loss"] if step == 1 else first_loss
                last_loss = record["loss"]
                window, window_start = [], time.perf_counter()
                if not math.isfinite(last_loss):
                    raise TrainingError(f"loss is {last_loss} at step {step}; stopping (try a lower "
                                        f"optimizer.learning_rate, or check the data)")
            if save_now or stopping:
                checkpoints.save(step, state, {"data": iterator.state(), "tokens_seen": tokens_seen,
                                               "first_loss": first_loss, "last_loss": last_loss},
                                 loss=eval_record.get("eval_loss", last_loss))
            else:
                checkpoints.raise_if_failed()
            if stopping:
                checkpoints.wait()
                raise Interrupted(f"stopped by {stop.name} after step {step} of {total_steps}; saved "
                                  f"{checkpoints.directory / str(step)}; rerun the same command to resume",
                                  stop.received)
    finally:
        stop.restore()
        bar.close()
        writer.close()
    summary = {"pairs": dataclasses.asdict(stats), "malformed": dict(data.report.malformed),
               "packing_efficiency": iterator.packing_efficiency(), "steps": total_steps,
               "first_loss": first_loss, "last_loss": last_loss, "eval": eval_record or None,
               "devices": len(mesh.devices.flat)}
    if data.held_out is not None:
        summary["eval_pairs"] = dataclasses.asdict(data.held_out.stats)
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("done: %d steps, loss %.4f -> %.4f; run dir %s", total_steps, first_loss, last_loss, run_dir)
    return TrainResult(run_dir=run_dir, steps=total_steps, first_loss=first_loss, last_loss=last_loss,
                       state=state, eval_loss=eval_record.get("eval_loss"), base=base)


def _record(step: int, epoch: int, fetched: list[dict]) -> tuple[dict, int]:
    """One metrics.jsonl record from the steps since the last: means of the per-step values."""
    mean = lambda key: float(np.mean([m[key] for m in fetched]))  # noqa: E731
    record = {"step": step, "epoch": epoch, "loss": mean("loss"),
              "learning_rate": float(fetched[-1]["learning_rate"]), "grad_norm": float(fetched[-1]["grad_norm"]),
              **{name: mean(name) for name in METRIC_NAMES},
              "pairs": int(sum(int(m["pairs"]) for m in fetched))}
    return record, int(sum(int(m["tokens"]) for m in fetched))
