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
