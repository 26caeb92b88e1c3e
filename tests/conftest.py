"""Shared fixtures. `../shared/data` (beside the checkout) holds public reference data; tests
that need it skip with that reason when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent: this test reads a public reference file kept "
                    "there (original seeds, demo files, ShareGPT), beside the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny decodable run directory (inference, serving and eval tests): random weights scaled
    up so greedy choices are clear-cut (no near-ties for float noise to flip), a byte-level BPE."""
    from helpers import make_tiny_run  # here, not at the top: helpers imports JAX, which most test files never need
    return make_tiny_run(tmp_path_factory.mktemp("infer") / "tiny-run")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per test module (starting one costs ~1-2 s); skips when Debian's
    chromium or chromium-driver is absent."""
    from browser import quit_browser, start_browser
    driver = start_browser()
    yield driver
    quit_browser(driver)
