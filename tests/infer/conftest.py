"""A tiny run directory shared by the inference tests: random weights scaled up so greedy
choices are clear-cut (no near-ties for float noise to flip), and a byte-level BPE."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import make_tiny_run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("infer") / "tiny-run")


@pytest.fixture(scope="session")
def tiny_model_loaded(tiny_run):
    from alpaca_jax.infer import load_model
    return load_model(tiny_run)


@pytest.fixture(scope="session")
def long_context_run(tmp_path_factory) -> Path:
    """The same tiny shape with a 2048-token context: long generations, long prompts."""
    return make_tiny_run(tmp_path_factory.mktemp("infer") / "long-run", max_position_embeddings=2048)
