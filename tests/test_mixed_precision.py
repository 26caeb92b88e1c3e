"""bf16 compute with fp32 master weights, the accelerator default of the 7B recipe, trains like
fp32: the loss curve of a tiny bf16 run stays within a stated tolerance of the fp32 run's."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.config import OptimizerConfig, load_config
from alpaca_jax.data.packing import pack_rows
from alpaca_jax.model import Llama, logical_axes
from alpaca_jax.model.params import init_params
from alpaca_jax.train.optim import learning_rate_schedule, make_optimizer
from alpaca_jax.train.state import fresh_train_state
from alpaca_jax.train.step import train_step
from helpers import random_examples, tiny_model

REPO = Path(__file__).resolve().parents[1]
STEPS = 25
# Stated tolerance: every step's bf16 loss within 1% of the fp32 loss (measured: at most 0.18%
# over the 25 steps). bf16 keeps 8 bits of mantissa, ~0.4% per rounding; the master weights and
# Adam state stay fp32, so the rounding does not compound into the weights.
RELATIVE_TOLERANCE = 0.01


def _loss_curve(dtype: str) -> np.ndarray:
    cfg = tiny_model(dtype=dtype, param_dtype="float32", num_layers=1)
    ids, masks = random_examples(np.random.default_rng(0), [20, 14, 25, 9, 30, 17, 22, 11], cfg.vocab_size)
    batch = {k: jnp.asarray(v)[None] for k, v in
             pack_rows([[0, 1], [2, 3], [4], [5, 6, 7]], ids, masks, 48, 0).items()}
    opt_cfg = OptimizerConfig(learning_rate=3e-3, schedule="constant", warmup_steps=0)
    schedule = learning_rate_schedule(opt_cfg, STEPS)
    optimizer = make_optimizer(opt_cfg, schedule, logical_axes(cfg))
    state = fresh_train_state(init_params(cfg, jax.random.key(0)), optimizer)
    step = jax.jit(functools.partial(train_step, model=Llama(cfg), optimizer=optimizer, schedule=schedule))
    losses = []
    for _ in range(STEPS):  # one fixed batch, memorised: the curve falls steeply
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))  # fp32 masters
    return np.asarray(losses)


def test_bf16_loss_curve_tracks_fp32():
    fp32, bf16 = _loss_curve("float32"), _loss_curve("bfloat16")
    assert fp32[-1] < 0.5 * fp32[0]  # the run learns, so the curves have a shape to compare
    np.testing.assert_allclose(bf16, fp32, rtol=RELATIVE_TOLERANCE)


def test_7b_recipes_compute_in_bf16_over_fp32_masters():
    recipes = sorted((REPO / "configs").glob("*_7b.yaml"))
    assert len(recipes) >= 1
    for path in recipes:
        cfg = load_config(path)
        if cfg.lora is not None:
            # LoRA/QLoRA: the trained adapters and their Adam state are fp32 by construction
            # (train/adapters.py); what the recipe picks is the frozen base, kept in bf16.
            base_dtype = cfg.lora.base_dtype or cfg.model.param_dtype
            assert (cfg.model.dtype, base_dtype, cfg.model.attention) == ("bfloat16", "bfloat16", "auto"), path
            continue
        assert (cfg.model.dtype, cfg.model.param_dtype, cfg.model.attention) == ("bfloat16", "float32", "auto"), path
