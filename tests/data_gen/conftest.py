"""Fixtures for data_gen tests: the project's own seed pool and the fake OpenAI server.

The generator tests run on data the project ships (data_gen/seed_tasks.jsonl), so they run in
any clone; only tests about an external file use `shared_data` (tests/conftest.py), which skips
with its reason when ../shared is absent."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_dg_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fake_openai = _load("fake_openai")


@pytest.fixture
def seed_file() -> Path:
    return REPO / "data_gen" / "seed_tasks.jsonl"


@pytest.fixture
def dead_url() -> str:
    """An OpenAI base_url on 127.0.0.1 where nothing listens."""
    return fake_openai.closed_port_url()


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
