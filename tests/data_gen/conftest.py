"""Fixtures for data_gen tests: the shared reference data and the fake OpenAI server."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_dg_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fake_openai = _load("fake_openai")


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared/data is absent (public reference data lives beside the checkout)")
    return SHARED / "data"


@pytest.fixture
def seed_file(shared_data) -> Path:
    return shared_data / "seed_tasks.jsonl"


@pytest.fixture
def fake_server():
    servers = []

    def start(**kwargs):
        server = fake_openai.FakeOpenAI(**kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
