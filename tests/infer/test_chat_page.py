"""The chat page of `serve` (GET /) in a real headless Chromium: the streamed answer is the greedy
answer of /v1/chat/completions (asked through the real `openai` client), the second turn
carries the first (as the server received it), Stop cuts the stream and leaves the server
healthy, a wrong API key shows the server's error, and `--no-ui` turns the page off."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import urllib.error
import urllib.request

import openai
import pytest
from browser import foreign_requests, requested_urls, screenshot, wait_for
from selenium.webdriver.common.by import By

from alpaca_jax.cli import _parser
from alpaca_jax.serve import ServeConfig, ServerThread, api_key_from_env, make_app

NAME = "tiny"


class Recorder:
    """ASGI wrapper: what the server received on /v1/chat/completions and whether each stream
    reached `[DONE]`. With `hold` set, a stream pauses after its first text (up to 60 s), so a
    test can press Stop mid-stream however fast the model decodes."""

    def __init__(self, app):
        self.app, self.requests, self.hold = app, [], False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        entry = {"body": b"", "done_sent": False, "finished": False}
        self.requests.append(entry)

        async def recording_receive():
            message = await receive()
            if message["type"] == "http.request":
                entry["body"] += message.get("body", b"")
            return message

        async def holding_send(message):
            await send(message)
            body = message.get("body", b"") if message["type"] == "http.response.body" else b""
            entry["done_sent"] |= b"data: [DONE]" in body
            if self.hold and b'"delta": {"content": ' in body:
                await asyncio.sleep(60)  # cancelled when the client hangs up
        try:
            await self.app(scope, recording_receive, holding_send)
        finally:
            entry["finished"] = True

    def body(self, index: int = -1) -> dict:
        return json.loads(self.requests[index]["body"])


@pytest.fixture(scope="module")
def page(tiny_model_loaded, browser):
    """The page of one server (reused by every test here) open in the module's browser. A chat
    page holds conversations, and an Alpaca run answers one instruction (a second exchange is a
    400, data/prompt.py), so the served model is a multi-turn one: the same weights with Koala's
    template (its preamble is short enough for the tiny context), sharing the decode compiles."""
    model = dataclasses.replace(tiny_model_loaded, template="koala")
    recorder = Recorder(make_app(model, ServeConfig(model_name=NAME)))
    with ServerThread(recorder) as running:
        running.recorder = recorder
        running.root = f"http://127.0.0.1:{running.port}/"
        running.client = openai.OpenAI(base_url=running.base_url, api_key="unused", max_retries=0, timeout=120)
        requested_urls(browser)  # drain what the browser did before this page
        browser.get(running.root)
        wait_for(lambda: _options(browser) == [NAME], what="the model picker to list /v1/models")
        yield running


def _options(driver) -> list[str]:
    return [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#model option")]


def _set(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def _answers(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('.msg.assistant .content')].map(e => e.textContent)")


def _idle(driver) -> bool:
    return driver.find_element(By.ID, "send").is_enabled()


def _send(driver, text: str, answers_before: int) -> str:
    _set(driver, "prompt", text)
    driver.find_element(By.ID, "send").click()
    wait_for(lambda: len(_answers(driver)) == answers_before + 1 and _idle(driver), what="the streamed answer")
    return _answers(driver)[-1]


def _greedy(client, messages, max_tokens: int) -> str:
    chat = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=max_tokens)
    return chat.choices[0].message.content


def test_streamed_answers_equal_the_api_and_the_second_turn_carries_the_first(page, browser):
    _set(browser, "temperature", "0")
    _set(browser, "max_tokens", "24")
    first = _send(browser, "Add 3 and 4.", 0)
    sent = page.recorder.body()  # before the client below adds its own request
    turn = [{"role": "user", "content": "Add 3 and 4."}]
    assert first and first == _greedy(page.client, turn, 24)
    assert sent["messages"] == turn and sent["stream"] is True
    assert (sent["model"], sent["temperature"], sent["max_tokens"]) == (NAME, 0, 24)

    second = _send(browser, "Now add 5.", 1)
    conversation = [*turn, {"role": "assistant", "content": first}, {"role": "user", "content": "Now add 5."}]
    assert page.recorder.body()["messages"] == conversation  # what the server received
    assert len(page.recorder.requests) == 3  # two from the page, one from the client in between
    assert second == _greedy(page.client, conversation, 24)
    assert not foreign_requests(requested_urls(browser), "127.0.0.1")
    screenshot(browser, "chat")


def test_stop_cuts_the_stream_and_the_server_stays_healthy(page, browser, caplog):
    browser.find_element(By.ID, "clear").click()
    _set(browser, "max_tokens", "40")
    page.recorder.hold = True  # the stream pauses after its first text: Stop lands mid-stream
    try:
        _set(browser, "prompt", "The sum of 3")
        browser.find_element(By.ID, "send").click()
        wait_for(lambda: _answers(browser) and _answers(browser)[-1], what="the first streamed words")
        browser.find_element(By.ID, "stop").click()
        wait_for(lambda: _idle(browser), what="the page to end the stream")
        stopped = _answers(browser)[-1]
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.stopped")
        wait_for(lambda: page.recorder.requests[-1]["finished"], what="the server to end the request")
        assert not page.recorder.requests[-1]["done_sent"]  # the server saw the hang-up and stopped
        assert not [r for r in caplog.records if r.levelno >= 30]  # quietly: a hang-up is no error
    finally:
        page.recorder.hold = False
    turn = [{"role": "user", "content": "The sum of 3"}]
    full = _greedy(page.client, turn, 40)  # the server answers the next request
    assert full.startswith(stopped) and len(stopped) < len(full)
    browser.find_element(By.ID, "regenerate").click()  # the page asks again, for the same conversation
    wait_for(lambda: _idle(browser) and not browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.stopped"),
             what="the regenerated answer")
    assert _answers(browser) == [full]
    assert page.recorder.body()["messages"] == turn and page.recorder.requests[-1]["done_sent"]


def test_a_wrong_api_key_shows_the_servers_error(tiny_model_loaded, browser, monkeypatch):
    monkeypatch.setenv("ALPACA_TEST_KEY", "s3cret")
    app = make_app(tiny_model_loaded, ServeConfig(model_name=NAME, api_key=api_key_from_env("ALPACA_TEST_KEY")))
    with ServerThread(app) as running:
        browser.get(f"http://127.0.0.1:{running.port}/")  # the page itself needs no key: it asks for one
        shown = lambda: browser.find_element(By.ID, "keyerror").text  # noqa: E731
        assert "wrong API key" in wait_for(shown, what="the key prompt")
        browser.execute_script("document.getElementById('keyerror').textContent = ''")
        _set(browser, "apikey", "wrong")
        browser.find_element(By.ID, "savekey").click()
        # The server's own message (serve.py's 401 body), shown again after the wrong key.
        assert wait_for(shown, what="the error") == "missing or wrong API key (send 'Authorization: Bearer <key>')"
        _set(browser, "prompt", "Add 1 and 2.")
        browser.find_element(By.ID, "send").click()  # a chat request with the wrong key
        errors = lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.error .content")  # noqa: E731
        assert wait_for(errors, what="the error")[0].text == shown()
        assert browser.find_element(By.ID, "prompt").get_attribute("value") == "Add 1 and 2."  # back to be resent
        _set(browser, "apikey", "s3cret")
        browser.find_element(By.ID, "savekey").click()
        wait_for(lambda: _options(browser) == [NAME], what="the models with the right key")
        assert not browser.find_element(By.ID, "keybox").is_displayed()
        _set(browser, "temperature", "0")
        _set(browser, "max_tokens", "8")
        browser.find_element(By.ID, "send").click()
        wait_for(lambda: _answers(browser) and _idle(browser), what="the answer with the right key")
        client = openai.OpenAI(base_url=running.base_url, api_key="s3cret", max_retries=0, timeout=120)
        assert _answers(browser) == [_greedy(client, [{"role": "user", "content": "Add 1 and 2."}], 8)]


def test_no_ui_turns_the_page_off(tiny_model_loaded):
    assert _parser().parse_args(["serve", "runs/x", "--no-ui"]).ui is False
    assert _parser().parse_args(["serve", "runs/x"]).ui is True
    with ServerThread(make_app(tiny_model_loaded, ServeConfig(model_name=NAME, ui=False))) as running:
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"http://127.0.0.1:{running.port}/", timeout=30)
        assert error.value.code == 404
        with urllib.request.urlopen(f"{running.base_url}/models", timeout=30) as response:
            assert json.loads(response.read())["data"][0]["id"] == NAME
