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
import tempfile
from pathlib import Path

import jax
import numpy as np

from alpaca_jax import sharding
from alpaca_jax.checkpoint import Checkpointer
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
from alpaca_jax.train import adapters
from alpaca_jax.train.loss import run_loss_chunk
from alpaca_jax.train.metrics import MetricsWriter
from alpaca_jax.train.optim import learning_rate_schedule, make_optimizer
from alpaca_jax.train.preference_loss import METRIC_NAMES
from alpaca_jax.train.preference_step import preference_eval_step, preference_train_step, reference_step
from alpaca_jax.train.state import state_shardings
from alpaca_jax.train.step_loop import (StepRecipe, TrainingError, TrainResult, extend_to_max_steps,
                                        run_in_directory, run_steps, start_or_resume, to_global)

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
    return run_in_directory(cfg, functools.partial(_train, devices=devices))


def _train(cfg: Config, run_dir: Path, is_main: bool, checkpoints: Checkpointer, resume_step: int | None,
           devices=None) -> TrainResult:
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
    layout = sharding.attention_layout(mesh, rules)  # fused attention per device, as in SFT
    model, ref_model = Llama(cfg.model, cfg.lora, layout), Llama(cfg.model, None, layout)
    place = functools.partial(to_global, accum=1, global_batch=rows, batch_sh=batch_sh)

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
    total_steps = extend_to_max_steps(iterator, cfg.train.max_steps)
    stats = data.train.stats
    log.info("data: %d pairs, %d kept, %d sequences truncated to %d tokens, %d dropped (no response token); "
             "%d tokens, %d scored; packing efficiency %.1f%%; %d steps", stats.pairs, stats.kept,
             stats.truncated, cfg.data.max_len, stats.dropped, stats.tokens, stats.response_tokens,
             100 * iterator.packing_efficiency(), total_steps)

    schedule = learning_rate_schedule(cfg.optimizer, total_steps)
    optimizer = make_optimizer(cfg.optimizer, schedule, adapters.trainable_layout(cfg)[1])
    shardings = state_shardings(cfg.model, optimizer, mesh, rules, cfg.lora)
    state, resumed = start_or_resume(cfg, optimizer, shardings, checkpoints, resume_step, iterator, run_dir,
                                     is_main, total_steps)
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
    recipe = StepRecipe(step_fn=step_fn, step_args=(frozen,), summarize=_summarize, counters=("tokens_seen",),
                        evaluate=evaluate, progress_label="dpo")
    done = run_steps(cfg, recipe, state, iterator, batch_sh, checkpoints, writer, total_steps, resume_step,
                     resumed, is_main)
    summary = {"pairs": dataclasses.asdict(stats), "malformed": dict(data.report.malformed),
               "packing_efficiency": iterator.packing_efficiency(), "steps": total_steps,
               "first_loss": done.first_loss, "last_loss": done.last_loss, "eval": done.eval_record or None,
               "devices": len(mesh.devices.flat)}
    if data.held_out is not None:
        summary["eval_pairs"] = dataclasses.asdict(data.held_out.stats)
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("done: %d steps, loss %.4f -> %.4f; run dir %s", total_steps, done.first_loss, done.last_loss, run_dir)
    return TrainResult(run_dir=run_dir, steps=total_steps, first_loss=done.first_loss, last_loss=done.last_loss,
                       state=done.state, eval_loss=done.eval_record.get("eval_loss"), base=base)


def _summarize(fetched: list[dict]) -> tuple[dict, dict[str, int]]:
    """A metrics.jsonl record's fields from the steps since the last: means of the per-step values."""
    mean = lambda key: float(np.mean([m[key] for m in fetched]))  # noqa: E731
    fields = {"loss": mean("loss"), "learning_rate": float(fetched[-1]["learning_rate"]),
              "grad_norm": float(fetched[-1]["grad_norm"]), **{name: mean(name) for name in METRIC_NAMES},
              "pairs": int(sum(int(m["pairs"]) for m in fetched))}
    return fields, {"tokens_seen": int(sum(int(m["tokens"]) for m in fetched))}
