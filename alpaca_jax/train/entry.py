"""`alpaca-jax train`'s one entry: supervised fine-tuning, or preference tuning when the config
has a `preference:` section. Not here: either loop (loop.py, preference_loop.py)."""

from __future__ import annotations

from alpaca_jax.config import Config
from alpaca_jax.train.step_loop import TrainResult
from alpaca_jax.train.loop import train as train_sft
from alpaca_jax.train.preference_loop import train_preference


def train(cfg: Config, devices=None) -> TrainResult:
    """Run (or resume) the configured training: DPO and kin with `cfg.preference`, else SFT."""
    return (train_sft if cfg.preference is None else train_preference)(cfg, devices)
