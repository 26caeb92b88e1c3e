"""Inference fixtures over the shared tiny run (tests/conftest.py): the loaded model, and a
long-context twin."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import make_tiny_run


@pytest.fixture(scope="session")
def tiny_model_loaded(tiny_run):
    from alpaca_jax.infer import load_model
    return load_model(tiny_run)


@pytest.fixture(scope="session")
def long_context_run(tmp_path_factory) -> Path:
    """The same tiny shape with a 2048-token context: long generations, long prompts."""
    return make_tiny_run(tmp_path_factory.mktemp("infer") / "long-run", max_position_embeddings=2048)
