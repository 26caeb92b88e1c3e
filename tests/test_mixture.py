"""Weighted data mixtures (issue 15): realised proportions, determinism, exact resume, and a tiny
model trained on ShareGPT conversations mixed with Alpaca rows and a `save_to_disk` directory."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import datasets
import numpy as np
import pytest

from alpaca_jax.config import CONFIG_DIR, config_from_dict, load_config
from alpaca_jax.data import BatchIterator, MixtureOrder
from alpaca_jax.data.mixture import quotas
from conftest import SHARED_DATA
from helpers import assert_resumes_exactly, random_examples

SIZES = (700, 130)  # a large source down-weighted, a small one up-weighted (repeated)


def _iterator(order: MixtureOrder, ids, masks):
    return BatchIterator(ids, masks, batch_size=8, seq_len=64, seed=order.seed, num_epochs=2, pad_id=0,
                         epoch_order=order)


def _source_of(example: np.ndarray) -> int:
    return int(np.searchsorted(np.cumsum(SIZES), example, side="right"))


def test_quotas_are_proportional_and_sum_to_the_total():
    assert quotas([0.75, 0.25], 4000).tolist() == [3000, 1000]
    assert quotas([1, 1, 1], 10).tolist() == [4, 3, 3]
    assert quotas([2, 1], 1).tolist() == [1, 0]


def test_mixture_realises_its_weights_and_resumes_exactly():
    order = MixtureOrder(SIZES, (0.75, 0.25), total=4000, seed=5)
    ids, masks = random_examples(np.random.default_rng(0), np.random.default_rng(1).integers(4, 40, sum(SIZES)), 50)
    epoch0 = order(0)
    shares = np.bincount([_source_of(i) for i in epoch0], minlength=2) / len(epoch0)
    assert abs(shares[0] - 0.75) <= 0.02 and abs(shares[1] - 0.25) <= 0.02
    assert order.realised(0) == shares.tolist()
    # Every example of the small source is drawn before any is drawn twice; the large source's
    # 3000 draws in epoch 0 are 3000 distinct examples, and epoch 1 goes on with other ones.
    small = epoch0[epoch0 >= SIZES[0]]
    counts = np.bincount(small - SIZES[0], minlength=SIZES[1])
    assert counts.max() - counts.min() <= 1
    large0, large1 = epoch0[epoch0 < SIZES[0]], order(1)[order(1) < SIZES[0]]
    assert np.bincount(large0, minlength=SIZES[0]).max() == 5  # 3000 draws over 700: 4-5 passes
    assert not np.array_equal(large0[:100], large1[:100])

    # Through the batch stream: each packed example is counted where it lands.
    it = _iterator(order, ids, masks)
    rows = it.epoch_rows(0)
    assert sorted(i for row in rows for i in row) == sorted(epoch0.tolist())
    full = list(_iterator(order, ids, masks))
    again = list(_iterator(MixtureOrder(SIZES, (0.75, 0.25), 4000, seed=5), ids, masks))
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(full, again))
    other = list(_iterator(MixtureOrder(SIZES, (0.75, 0.25), 4000, seed=6), ids, masks))
    assert not np.array_equal(other[0]["input_ids"], full[0]["input_ids"])
    for stop in (7, len(full) // 2 + 3):  # a run killed after `stop` batches and resumed
        assert_resumes_exactly(lambda: _iterator(MixtureOrder(SIZES, (0.75, 0.25), 4000, seed=5), ids, masks),
                               full, stop)


def test_shipped_recipes_load():
    vicuna = load_config(CONFIG_DIR / "vicuna_7b.yaml")
    assert vicuna.data.template == "vicuna_v1.1" and vicuna.data.max_len == 2048
    koala = load_config(CONFIG_DIR / "koala_7b.yaml")
    assert len(koala.data.mixture) == 7 and koala.data.template == "koala" and koala.train.num_epochs == 2


@pytest.mark.parametrize("data,message", [
    ({"mixture": [{"path": "a.json", "weight": 0}]}, "weight of a.json must be positive"),
    ({"mixture": [{"weight": 1}]}, "every source needs a path"),
    ({"mixture": ["a.json"]}, "data.mixture[0]: expected a mapping"),
    ({"mixture": [{"path": "a.json", "share": 1}]}, "unknown config key 'data.mixture[0].share'"),
    ({"template": "chatml"}, "config key 'data.template': expected one of"),
    ({"mixture_size": 0}, "data.mixture_size must be positive"),
])
def test_bad_mixture_configs_name_the_key(data, message):
    from alpaca_jax.config import ConfigError
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({"data": data})


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    from alpaca_jax.train import train
    shared = SHARED_DATA
    if not shared.is_dir():
        pytest.skip("../shared/data is absent (public reference data lives beside the checkout)")
    root = tmp_path_factory.mktemp("mixture")
    alpaca_rows = json.loads((shared / "alpaca_en_demo.json").read_text())
    datasets.Dataset.from_list(alpaca_rows[:200]).save_to_disk(str(root / "alpaca_arrow"))
    cfg = config_from_dict(  # a smaller model than the tiny preset: 30 steps in a few seconds
        {"model": {"preset": "tiny", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
                   "num_layers": 2, "attention": "chunked", "scan_layers": False},
         "data": {"template": "vicuna_v1.1", "max_len": 128, "mixture_size": 600, "mixture": [
             {"path": str(shared / "dummy_conversation.json"), "weight": 0.5},
             {"path": str(shared / "alpaca_en_demo.json"), "weight": 0.3},
             {"path": str(root / "alpaca_arrow"), "weight": 0.2}]},
         "optimizer": {"learning_rate": 1e-2, "b2": 0.95, "warmup_steps": 3},
         "train": {"max_steps": 30, "batch_size": 8, "log_every": 5, "progress_bar": False},
         "checkpoint": {"every": 15, "keep": None, "async_save": False},
         "run": {"dir": str(root / "run"), "tensorboard": False}})
    result = train(cfg)
    # The same run "killed" after step 15's checkpoint: a copy without the later one, resumed.
    shutil.copytree(root / "run", root / "resumed")
    shutil.rmtree(root / "resumed" / "checkpoints" / "30")
    train(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(root / "resumed"))))
    return result, json.loads((root / "run" / "summary.json").read_text()), root


def test_tiny_model_trains_on_conversations_mixed_with_alpaca(mixed_run):
    result, summary, _ = mixed_run
    assert result.last_loss < 0.7 * result.first_loss  # 6.2 -> 3.2 measured
    sources = summary["sources"]
    assert [s["load"]["conversations"] for s in sources] == [500, 999, 200]  # every row loaded
    assert [s["per_epoch"] for s in sources] == [300, 180, 120]
    assert [round(s["realised_share"], 6) for s in sources] == [0.5, 0.3, 0.2]
    assert summary["tokenize"]["examples"] == 1699 and summary["tokenize"]["truncated"] > 0


def test_a_mixture_run_resumed_after_a_kill_repeats_every_metric(mixed_run):
    from alpaca_jax.train import read_metrics
    *_, root = mixed_run
    comparable = lambda records: [{k: v for k, v in r.items() if k != "tokens_per_second"}  # noqa: E731
                                  for r in records]
    reference, resumed = read_metrics(root / "run"), read_metrics(root / "resumed")
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == [1, 5, 10, 15, 20, 25, 30]
    assert comparable(resumed) == comparable(reference)  # the same stream, bitwise the same losses
