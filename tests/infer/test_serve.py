"""`serve` through the real `openai` client and raw HTTP on 127.0.0.1: completions, chat,
streaming, concurrency, errors, disconnects, API keys, and `alpaca-jax generate` using it as
its teacher."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request

import openai
import pytest

import datasets

from alpaca_jax.data import tokenize_dataset
from alpaca_jax.data.templates import alpaca_prompt
from alpaca_jax.infer import Row, SamplingConfig, decode_rows, load_model
from alpaca_jax.serve import ServeConfig, ServerThread, make_app
from data_gen.cli import EXIT_CODES

NAME = "tiny"


@pytest.fixture(scope="module")
def server(tiny_model_loaded):
    # A gathering window long enough that the concurrent test's 8 requests form one batch of
    # the same bucket as n=8 (fewer shapes to compile).
    app = make_app(tiny_model_loaded, ServeConfig(model_name=NAME, gather_ms=300))
    with ServerThread(app) as running:
        running.engine = app.state.engine
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def _complete(client, prompt: str, **kw):
    return client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=8, **kw)


def _training_prompt_ids(model, instruction: str) -> list[int]:
    """The ids training fed before the answer: training's own tokenizer path on an Alpaca row,
    cut where its loss mask starts (the first answer token)."""
    kept, _ = tokenize_dataset(datasets.Dataset.from_list([{"instruction": instruction, "input": "", "output": "7"}]),
                               model.tokenizer, model.max_len, model.add_bos)
    ids, mask = list(kept["input_ids"][0]), list(kept["loss_mask"][0])
    return [int(x) for x in ids[:mask.index(True)]]


def test_completions_chat_streaming_and_not_give_the_same_text(client, tiny_model_loaded):
    """Every endpoint's text equals `infer` decoding the prompt ids training saw (not only each other)."""
    messages = [{"role": "user", "content": "Add 3 and 4."}]
    ids = _training_prompt_ids(tiny_model_loaded, "Add 3 and 4.")
    reference = decode_rows(tiny_model_loaded, [Row(ids, SamplingConfig(max_new_tokens=8))])[0]
    whole = _complete(client, alpaca_prompt("Add 3 and 4."))
    streamed = "".join(c.choices[0].text for c in _complete(client, alpaca_prompt("Add 3 and 4."), stream=True))
    chat = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=8)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}))
    chat_streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].text == streamed == chat.choices[0].message.content == chat_streamed == reference.text
    assert len(whole.choices[0].text) > 0 and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), 8)
    assert (chat.usage.prompt_tokens, chunks[-1].usage.total_tokens) == (len(ids), len(ids) + 8)
    assert [m.id for m in client.models.list()] == [NAME]


def test_n_stop_and_seed(client):
    free = _complete(client, "The sum of 1").choices[0].text
    stop = free[3:5]
    stopped = _complete(client, "The sum of 1", stop=[stop]).choices[0]
    assert stopped.text == free[:free.find(stop)] and stopped.finish_reason == "stop"
    sampled = client.completions.create(model=NAME, prompt="The sum of 1", temperature=1.5, max_tokens=8, n=8, seed=5)
    again = client.completions.create(model=NAME, prompt="The sum of 1", temperature=1.5, max_tokens=8, n=8, seed=5)
    texts = [c.text for c in sampled.choices]
    assert texts == [c.text for c in again.choices] and len(set(texts)) > 1
    assert sampled.usage.completion_tokens == 64


def test_concurrent_clients_get_their_solo_answers_in_shared_batches(client, server):
    prompts = [f"The sum of {i}" + " and" * i for i in range(8)]
    solo = [_complete(client, p).choices[0].text for p in prompts]
    shared_before = server.engine.shared_steps
    results: dict[int, str] = {}

    def ask(i: int):
        if i % 2:
            results[i] = _complete(client, prompts[i]).choices[0].text
        else:
            results[i] = "".join(c.choices[0].text for c in _complete(client, prompts[i], stream=True))
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(8)] == solo
    assert len(set(solo)) > 1
    assert server.engine.shared_steps > shared_before  # requests shared decode steps


def _post(url: str, body: bytes | str, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body.encode() if isinstance(body, str) else body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


BAD_REQUESTS = [  # (endpoint, body, the parameter the error names, words in its message)
    ("completions", "{not json", None, "not valid JSON"),
    ("completions", "[1, 2]", None, "JSON object"),
    ("completions", {"model": NAME, "prompt": "hi", "max_tokens": "ten"}, "max_tokens", "integer"),
    ("completions", {"model": NAME, "prompt": "hi", "temperature": "hot"}, "temperature", "number"),
    ("completions", {"model": NAME, "prompt": "hi", "stream": "yes"}, "stream", "boolean"),
    ("completions", {"model": NAME, "prompt": "hi", "n": True}, "n", "integer"),
    ("completions", {"model": NAME, "prompt": 42}, "prompt", "string"),
    ("completions", {"model": NAME, "prompt": "hi", "top_p": 0}, None, "top_p"),
    ("completions", {"model": NAME, "prompt": "Café " * 300}, "prompt", "context"),
    ("completions", {"prompt": "hi"}, "model", "required"),
    ("chat/completions", {"model": NAME, "messages": "hi"}, "messages", "array"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, "messages", "role"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "Café " * 300}]}, "messages", "context"),
]


@pytest.mark.parametrize("endpoint, body, param, words", BAD_REQUESTS)
def test_bad_requests_get_openai_style_400s(server, endpoint, body, param, words):
    status, reply = _post(f"{server.base_url}/{endpoint}", body if isinstance(body, str) else json.dumps(body))
    assert status == 400
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["param"] == param
    assert words in reply["error"]["message"]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_unknown_model_gets_openais_404_model_not_found(client, server, endpoint):
    """As OpenAI answers: HTTP 404, type invalid_request_error, code model_not_found, param model
    (the `openai` client raises NotFoundError)."""
    with pytest.raises(openai.NotFoundError) as caught:
        if endpoint == "chat":
            client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
        else:
            client.completions.create(model="gpt-4", prompt="hi")
    error = caught.value.body if "error" not in caught.value.body else caught.value.body["error"]
    assert caught.value.status_code == 404
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "model_not_found", "model")
    assert "gpt-4" in error["message"] and "does not exist" in error["message"]


def test_disconnected_stream_leaves_the_server_healthy(client, server):
    expected = _complete(client, "The sum of 2").choices[0].text
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(
        {"model": NAME, "prompt": "The sum of 3", "max_tokens": 50, "temperature": 0, "stream": True}),
        {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.sock.close()  # hang up mid-stream
    connection.close()
    assert _complete(client, "The sum of 2").choices[0].text == expected


def test_api_key_is_required_when_configured(tiny_model_loaded):
    app = make_app(tiny_model_loaded, ServeConfig(model_name=NAME, api_key="s3cret"))
    with ServerThread(app) as running:
        status, reply = _post(f"{running.base_url}/completions", json.dumps({"model": NAME, "prompt": "hi"}))
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.base_url, api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=running.base_url, api_key="s3cret", max_retries=0)
        assert good.completions.create(model=NAME, prompt="hi", max_tokens=2).usage.completion_tokens <= 2


def test_generate_uses_serve_as_its_teacher(tmp_path, monkeypatch, long_context_run):
    """The closed Self-Instruct loop: `alpaca-jax generate` against `serve` of a tiny model
    (its context holds the generator's few-shot prompt)."""
    from alpaca_jax.cli import main
    model = load_model(long_context_run)
    with ServerThread(make_app(model, ServeConfig(model_name="teacher"))) as running:
        monkeypatch.setenv("TEACHER_KEY", "unused")
        out = tmp_path / "generated"
        code = main(["generate", "configs/generate/alpaca.yaml", f"teacher.base_url={running.base_url}",
                     "teacher.model=teacher", "teacher.api_key_env=TEACHER_KEY", "sampling.instructions.max_tokens=16",
                     "teacher.max_retries=0", "pipeline.requests_per_round=3", "pipeline.max_rounds=1",
                     "pipeline.num_instructions=5", f"output.dir={out}", "output.progress=false"])
    assert code == EXIT_CODES["max_rounds"]  # one round, as asked; a random model writes no usable task
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert len(journal) == 3 and all(isinstance(r["text"], str) and r["completion_tokens"] > 0 for r in journal)
    report = json.loads((out / "report.json").read_text())
    assert report["this_run"]["completed"] == 3


def test_multi_turn_alpaca_is_refused_as_the_exported_template_refuses_it(server):
    """One policy: an Alpaca run was trained on single instructions; the server refuses a
    conversation with earlier exchanges in the words of the exported Jinja template."""
    from alpaca_jax.data.templates import SINGLE_TURN_ONLY
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "More"}]
    status, reply = _post(f"{server.base_url}/chat/completions", json.dumps({"model": NAME, "messages": turns}))
    assert status == 400 and reply["error"]["param"] == "messages"
    assert reply["error"]["message"] == SINGLE_TURN_ONLY
