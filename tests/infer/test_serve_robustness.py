"""The server's engine under failure: a cancelled request, a decode thread that dies, a client
that hangs up on a non-streaming request; and `finish_reason` against the token counts."""

from __future__ import annotations

import dataclasses
import http.client
import json
import time

import openai
import pytest

from alpaca_jax.infer import LoadedModel, Row, SamplingConfig
from alpaca_jax.infer import batcher
from alpaca_jax.infer.batcher import BatchingEngine
from alpaca_jax.serve import ServeConfig, ServerThread, make_app

NAME = "tiny"


def test_a_cancelled_request_does_not_kill_the_decode_thread(tiny_model_loaded):
    """Before: the engine completed a cancelled future (InvalidStateError outside any try), the
    decode thread died, and every later request waited forever."""
    engine = BatchingEngine(tiny_model_loaded, max_batch=4, gather_s=0)
    try:
        ids = tiny_model_loaded.encode("The sum of 1")
        for _ in range(2):
            gone = engine.submit(Row(ids, SamplingConfig(max_new_tokens=3)))
            gone.cancel()  # the client went away
            answer = engine.submit(Row(ids, SamplingConfig(max_new_tokens=3))).result(timeout=120)
            assert len(answer.token_ids) <= 3
        assert engine.healthy
    finally:
        engine.close()


class _Died(BaseException):
    """Escapes every `except Exception`, as a bug in the loop itself would."""


def test_a_dead_decode_thread_fails_its_requests_and_reports_unhealthy(tiny_model_loaded, monkeypatch):
    class Broken(batcher.DecodeBatch):
        def step(self):
            raise _Died("simulated crash of the decode loop")
    monkeypatch.setattr(batcher, "DecodeBatch", Broken)
    app = make_app(tiny_model_loaded, ServeConfig(model_name=NAME, gather_ms=0))
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError) as first:  # the request in flight is failed, not left hanging
            client.completions.create(model=NAME, prompt="The sum of 1", max_tokens=4)
        assert first.value.status_code == 503 and "_Died" in str(first.value)
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("GET", "/health")
        health = connection.getresponse()
        assert health.status == 503 and "decode engine failed" in json.loads(health.read())["error"]["message"]
        with pytest.raises(openai.InternalServerError):  # later requests fail at once
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert not app.state.engine.healthy


def test_a_disconnected_non_streaming_request_is_freed(tiny_model_loaded, monkeypatch):
    """Before: a non-streaming request whose client hung up kept decoding to max_tokens."""
    steps = []

    class Slow(batcher.DecodeBatch):  # ~30 ms a step, so the hang-up lands mid-answer
        def step(self):
            time.sleep(0.03)
            steps.append(self.live)
            return super().step()
    monkeypatch.setattr(batcher, "DecodeBatch", Slow)
    fields = {f.name: getattr(tiny_model_loaded, f.name) for f in dataclasses.fields(LoadedModel)}
    model = _NoEos(**fields)  # never stops early: only the cap (or the hang-up) ends a row
    app = make_app(model, ServeConfig(model_name=NAME, gather_ms=0))
    with ServerThread(app) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("POST", "/v1/completions", json.dumps(
            {"model": NAME, "prompt": "The sum of 3", "max_tokens": 120, "temperature": 0}),
            {"Content-Type": "application/json"})
        deadline = time.monotonic() + 60
        while len(steps) < 5:
            assert time.monotonic() < deadline, "decoding never started"
            time.sleep(0.01)
        connection.sock.close()  # hang up before the answer
        connection.close()
        deadline = time.monotonic() + 20
        while getattr(app.state.engine, "dropped", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        assert len(steps) < 100  # freed long before the 120-token cap (before: decoded to the cap)
        assert app.state.engine.dropped == 1


class _NoEos(LoadedModel):
    @property
    def eos_id(self) -> int:
        return -1


@pytest.fixture(scope="module")
def served(tiny_model_loaded):
    app = make_app(tiny_model_loaded, ServeConfig(model_name=NAME, gather_ms=0))
    with ServerThread(app) as server:
        yield openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def test_finish_reason_is_length_exactly_when_the_cap_is_hit(served):
    seen = set()
    for prompt in ("The sum of 1", "Add 3 and 4.", "x"):
        free = served.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0).choices[0].text
        stop = free[len(free) // 3:][:2]  # hit about a third of the way: a stop before the cap
        for cap, stops in ((1, []), (2, []), (5, []), (40, []), (40, [stop])):
            for stream in (False, True):
                if stream:
                    chunks = list(served.completions.create(model=NAME, prompt=prompt, max_tokens=cap, temperature=0,
                                                            stop=stops, stream=True,
                                                            stream_options={"include_usage": True}))
                    reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                    assert len(reason) == 1
                    reason, tokens = reason[0], chunks[-1].usage.completion_tokens
                else:
                    reply = served.completions.create(model=NAME, prompt=prompt, max_tokens=cap, temperature=0,
                                                      stop=stops)
                    reason, tokens = reply.choices[0].finish_reason, reply.usage.completion_tokens
                assert (reason == "length") == (tokens == cap), (prompt, cap, reason, tokens)
                assert reason in ("length", "stop") and tokens <= cap
                seen.add(reason)
    assert seen == {"length", "stop"}  # both cases were exercised
