"""Held-out loss during training: the logged eval loss is the exact mean response-token loss
over the held-out rows, and those rows never reach a training batch."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from alpaca_jax.data import load_instruction_dataset
from alpaca_jax.data.split import held_out_split
from alpaca_jax.model import Llama
from alpaca_jax.train import read_metrics
from alpaca_jax.train.loop import build_batches


def _direct_mean_loss(cfg, params, input_ids, loss_mask) -> float:
    """Each held-out example alone (unpacked; padded to one shape so it compiles once, the
    padding after it invisible to a causal model), with a float64 log-softmax in numpy."""
    apply = jax.jit(Llama(cfg.model).apply)
    width = cfg.data.max_len
    total, count = 0.0, 0.0
    for ids, mask in zip(input_ids, loss_mask):
        n = len(ids) - 1
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :n] = ids[:-1]
        segments = (np.arange(width) < n).astype(np.int32)[None]
        logits = np.asarray(jax.device_get(apply({"params": params}, tokens, np.arange(width)[None], segments)),
                            np.float64)[0, :n]
        top = logits.max(-1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        token_loss = -log_probs[np.arange(n), ids[1:]]
        weight = np.asarray(mask[1:], np.float64)
        total += float((token_loss * weight).sum())
        count += float(weight.sum())
    return total / count


def test_logged_eval_loss_is_the_mean_response_token_loss_over_the_held_out_set(held_out_run):
    cfg, result = held_out_run
    records = read_metrics(cfg.run.path)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    *_, held_out = build_batches(cfg, cfg.run.path)
    expected = _direct_mean_loss(cfg, result.state.params, held_out.input_ids, held_out.loss_mask)
    assert evals[-1]["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert evals[-1]["eval_perplexity"] == pytest.approx(np.exp(expected), rel=1e-5)
    assert evals[-1]["eval_tokens"] == sum(int(np.sum(m)) for m in held_out.loss_mask)
    assert result.eval_loss == evals[-1]["eval_loss"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] * 1.5  # finite and sane


def test_held_out_rows_never_appear_in_training_batches(held_out_run):
    cfg, _ = held_out_run
    iterator, *_, held_out = build_batches(cfg, cfg.run.path)
    assert held_out.stats.examples == held_out.stats.kept == 10 + 6
    held = {tuple(ids[:-1].tolist()) for ids in held_out.input_ids}
    trained = set()
    for batch in iterator:  # every epoch of the stream the run trains on
        for ids, seg in zip(batch["input_ids"], batch["segment_ids"]):
            for s in set(seg.tolist()) - {0}:
                trained.add(tuple(ids[seg == s].tolist()))
    assert len(trained) == 40 + 1 - 10 - held_out.duplicates_dropped
    assert not trained & held


def test_split_is_fixed_by_seed(held_out_run):
    cfg, _ = held_out_run
    ds = load_instruction_dataset(cfg.data.train_files)
    first, again, other = (held_out_split(ds, 0.25, seed) for seed in (0, 0, 1))
    assert first.eval["instruction"] == again.eval["instruction"] != other.eval["instruction"]
    assert len(first.eval) == 10 and len(first.train) == 31


def test_a_training_row_equal_to_an_eval_file_row_is_not_trained_on(held_out_run):
    cfg, _ = held_out_run
    ds = load_instruction_dataset(cfg.data.train_files)
    split = held_out_split(ds, 0.0, 0, load_instruction_dataset(cfg.data.eval_files))
    assert split.duplicates_dropped == 1 and len(split.train) == 40 and len(split.eval) == 6
    assert not set(split.train["instruction"]) & set(split.eval["instruction"])


def test_keep_best_keeps_the_checkpoint_with_the_lowest_eval_loss(held_out_run):
    from alpaca_jax.checkpoint import Checkpointer
    cfg, _ = held_out_run
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(cfg.run.path) if "eval_loss" in r}
    assert set(evals) == {3, 6}  # every checkpoint step was an eval step
    kept = set(Checkpointer(cfg.run.path, read_only=True).all_steps())
    assert kept == {6, min(evals, key=evals.get)}  # keep=1 (the latest) + the best by eval loss
