"""Teacher client behaviour that the pipelines rely on: Retry-After, backoff, fatal errors."""

from __future__ import annotations

import time

import openai
import pytest

from alpaca_jax.llm.budget import Budget
from alpaca_jax.llm.client import Request, Teacher, TeacherFatalError, _retry_after_seconds
from alpaca_jax.llm.journal import Journal
from data_gen.config import BudgetConfig, TeacherConfig


def _teacher(server, tmp_path, **overrides):
    config = TeacherConfig(base_url=server.url, timeout_s=2.0, **overrides)
    client = openai.OpenAI(api_key="dummy", base_url=server.url, max_retries=0, timeout=2.0)
    return Teacher(config, Journal(tmp_path / "journal.jsonl"), Budget(BudgetConfig(), config.model), client)


def test_retry_after_is_honoured_over_backoff(tmp_path, fake_server):
    server = fake_server(fault_rate=1.0, kinds=("rate_limit",))  # 429 twice, Retry-After 0.05 s
    teacher = _teacher(server, tmp_path, backoff_initial_s=10.0, backoff_max_s=10.0)
    start = time.monotonic()
    responses = teacher.complete([Request(key="k", prompt="Come up with a series of tasks:\n1. Say hi to me now\n2.")])
    elapsed = time.monotonic() - start
    assert responses["k"] is not None and responses["k"].text
    assert teacher.stats.retries == 2 and 0.1 <= elapsed < 2.0  # 10 s backoff would have been used otherwise


def test_gives_up_after_max_retries_without_journaling(tmp_path, fake_server):
    server = fake_server(fault_rate=1.0, kinds=("server_error",))
    teacher = _teacher(server, tmp_path, max_retries=1, backoff_initial_s=0.01, backoff_max_s=0.01)
    responses = teacher.complete([Request(key="k", prompt="hello there")])
    assert responses["k"] is None and teacher.stats.failed == 1 and len(teacher.journal) == 0
    assert len(server.log) == 2


def test_retry_after_header_forms():
    assert _retry_after_seconds({"retry-after": "2"}) == 2.0
    assert _retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert 0 <= _retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert _retry_after_seconds({}) is None and _retry_after_seconds(None) is None


def test_authentication_error_stops_the_run(tmp_path):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    class Deny(BaseHTTPRequestHandler):
        def do_POST(self):
            body = b'{"error": {"message": "bad key"}}'
            self.send_response(401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        class S:
            url = f"http://127.0.0.1:{server.server_port}/v1"
        teacher = _teacher(S, tmp_path)
        with pytest.raises(TeacherFatalError, match="bad key"):
            teacher.complete([Request(key="k", prompt="hi")])
    finally:
        server.shutdown()
        server.server_close()
