"""The teacher LLM: the `openai` client, bounded concurrency, retries, journal and budget.

Any OpenAI-compatible server works (OpenAI, vLLM, llama.cpp, Ollama): `teacher.base_url`
points the client at it and `teacher.api` picks chat-completions or legacy completions.
`Teacher.complete(requests)` sends a batch with at most `max_concurrency` requests in flight
and returns the responses by request key. Each request carries its own sampling parameters
(the pipelines take them from the stage's `sampling.*` block). It never raises for one bad
request:

- 429 / 5xx / 408 / timeouts / connection errors are retried with exponential backoff and
  jitter, honouring `Retry-After` (the client's own retries are off so this is the only loop);
- a response that is not an OpenAI response ("garbage") is recorded as such and skipped;
- a request that still fails after all retries is skipped and *not* journaled (it was not
  paid for), so a rerun tries it again;
- a request the budget no longer allows is not sent (its key is absent from the answer).

The last failure is kept as one line (`last_error`) so a run that gives up on a dead or broken
teacher can say why.

Authentication / permission / unknown-model errors cannot get better by retrying and stop the
run (`TeacherFatalError`). Every completed response is fsync'ed to the journal before it is
returned, and a request already in the journal is answered from it without a network call.

Not here: prompt text and parsing (prompts.py), what to ask (the pipelines).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import openai

from alpaca_jax.errors import UserError
from alpaca_jax.llm.budget import Budget
from alpaca_jax.llm.config import TeacherConfig
from alpaca_jax.llm.journal import Journal

__all__ = ["Request", "Response", "Teacher", "TeacherFatalError", "TeacherStats", "request_id",
           "parse_completion"]

_RETRY_STATUS = {408, 409, 429}
_FATAL = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


class TeacherFatalError(UserError, RuntimeError):
    """A teacher error no retry can fix (bad key, unknown model, wrong URL)."""


@dataclass(frozen=True)
class Request:
    key: str                      # deterministic name in the pipeline, e.g. "alpaca/r3/2"
    prompt: str
    params: tuple = ()            # sampling and stop parameters sent as is: ((name, value), ...)

    @staticmethod
    def build(key: str, prompt: str, sampling: dict[str, Any], stop: list[str]) -> "Request":
        params = {**sampling, "stop": list(stop)}
        return Request(key=key, prompt=prompt, params=tuple(sorted(params.items())))


@dataclass(frozen=True)
class Response:
    text: str | None              # None for a garbage (unparseable) HTTP response
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    from_journal: bool = False

    @property
    def garbage(self) -> bool:
        return self.text is None


@dataclass
class TeacherStats:
    sent: int = 0                 # HTTP requests sent by this process, retries included
    completed: int = 0            # requests answered over the network in this process
    from_journal: int = 0         # requests answered from the journal (no network)
    retries: int = 0
    failed: int = 0               # gave up after retries or a 400: skipped, not journaled
    garbage: int = 0              # unparseable HTTP responses (journaled, never re-sent)
    skipped_for_budget: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def count_error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1


def request_id(request: Request, config: TeacherConfig) -> str:
    """Content address of a request: same pipeline position, prompt and sampling -> same id."""
    payload = {"key": request.key, "prompt": request.prompt, "model": config.model,
               "api": config.api, "sampling": dict(request.params)}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:32]


class Teacher:
    def __init__(self, config: TeacherConfig, journal: Journal, budget: Budget,
                 client: openai.OpenAI | None = None):
        self.config = config
        self.journal = journal
        self.budget = budget
        self.stats = TeacherStats()
        self.last_error: str | None = None
        self._answered = False  # has any HTTP call of this run reached the teacher?
        self._stats_lock = threading.Lock()
        self._jitter = random.Random()  # jitter must differ between clients, so no fixed seed
        if client is None:
            api_key = os.environ.get(config.api_key_env)
            if not api_key:
                raise TeacherFatalError(
                    f"environment variable {config.api_key_env} is not set (teacher.api_key_env); "
                    "local servers accept any dummy value")
            client = openai.OpenAI(api_key=api_key, base_url=config.base_url,
                                   timeout=config.timeout_s, max_retries=0)
        self.client = client

    @property
    def endpoint(self) -> str:
        return str(self.client.base_url).rstrip("/")

    # -- batch API ------------------------------------------------------------------------
    def complete(self, requests: list[Request],
                 on_done: Callable[[], None] | None = None) -> dict[str, Response | None]:
        """Responses by request key, in any order. None: failed after retries (not journaled,
        a rerun asks again); key absent: not sent because the budget ran out."""
        results: dict[str, Response | None] = {}
        pending = []
        for request in requests:
            record = self.journal.get(request_id(request, self.config))
            if record is not None:
                results[request.key] = self._replay(record)
                if on_done:
                    on_done()
            else:
                pending.append(request)
        if not pending:
            return results
        fatal: list[BaseException] = []

        def work(request: Request) -> None:
            try:
                if fatal:
                    results[request.key] = None
                    return
                if not self.budget.reserve():
                    with self._stats_lock:
                        self.stats.skipped_for_budget += 1
                    return
                try:
                    response = self._complete_one(request)
                except BaseException:
                    self.budget.release()
                    raise
                if response is None:
                    self.budget.release()
                results[request.key] = response
            except TeacherFatalError as e:
                fatal.append(e)
                results[request.key] = None
            finally:
                if on_done:
                    on_done()

        with ThreadPoolExecutor(max_workers=self.config.max_concurrency) as pool:
            list(pool.map(work, pending))
        if fatal:
            raise fatal[0]
        return results

    def _replay(self, record: dict[str, Any]) -> Response:
        self.budget.record(record.get("prompt_tokens", 0), record.get("completion_tokens", 0))
        with self._stats_lock:
            self.stats.from_journal += 1
        return Response(record.get("text"), record.get("finish_reason"),
                        record.get("prompt_tokens", 0), record.get("completion_tokens", 0),
                        from_journal=True)

    # -- one request ----------------------------------------------------------------------
    def _complete_one(self, request: Request) -> Response | None:
        rid = request_id(request, self.config)
        attempt = 0
        while True:
            with self._stats_lock:
                self.stats.sent += 1
            try:
                raw = self._call(request, rid)
            except _FATAL as e:
                raise TeacherFatalError(f"teacher refused the request: {_one_line(e)}") from None
            except Exception as e:  # noqa: BLE001 - every failure is classified below
                kind = _classify(e)
                if isinstance(e, openai.APIStatusError):
                    self._answered = True  # an HTTP status is an answer: the server is there
                with self._stats_lock:
                    self.stats.count_error(type(e).__name__)
                    prefix = "garbage response, " if kind == "garbage" else ""
                    self.last_error = f"{prefix}{type(e).__name__}: {_one_line(e)}"
                if kind == "garbage":
                    return self._record(rid, request, None)
                if kind == "retry" and attempt < self._retries_for(e):
                    with self._stats_lock:
                        self.stats.retries += 1
                    time.sleep(self._delay(e, attempt))
                    attempt += 1
                    continue
                with self._stats_lock:
                    self.stats.failed += 1
                return None
            self._answered = True
            if raw is None:
                with self._stats_lock:
                    self.last_error = "garbage response: a 200 answer holding no completion text"
            return self._record(rid, request, raw)

    def _retries_for(self, error: Exception) -> int:
        """Retries allowed for this failure: few for an endpoint that was never reached."""
        unreachable = (isinstance(error, openai.APIConnectionError)
                       and not isinstance(error, openai.APITimeoutError))
        if unreachable and not self._answered:
            return min(self.config.max_connect_retries, self.config.max_retries)
        return self.config.max_retries

    def _call(self, request: Request, rid: str) -> tuple[str, str | None, int, int] | None:
        """One HTTP call; the (text, finish_reason, usage) of a well-formed response, or None."""
        sampling = dict(request.params)
        # The id travels as a header so servers (and our tests) can see which logical request
        # an HTTP call belongs to; OpenAI ignores unknown headers.
        headers = {"X-Alpaca-Jax-Request": rid}
        if self.config.api == "chat":
            result = self.client.chat.completions.create(
                model=self.config.model, messages=[{"role": "user", "content": request.prompt}],
                extra_headers=headers, **sampling)
        else:
            result = self.client.completions.create(
                model=self.config.model, prompt=request.prompt, extra_headers=headers, **sampling)
        return parse_completion(result, self.config.api)

    def _record(self, rid: str, request: Request, raw) -> Response:
        if raw is None:
            text, finish, prompt_tokens, completion_tokens = None, None, 0, 0
        else:
            text, finish, prompt_tokens, completion_tokens = raw
        self.journal.append({"id": rid, "key": request.key, "text": text, "finish_reason": finish,
                             "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens})
        self.budget.record(prompt_tokens, completion_tokens, reserved=True)
        with self._stats_lock:
            self.stats.completed += 1
            self.stats.garbage += text is None
        return Response(text, finish, prompt_tokens, completion_tokens)

    def _delay(self, error: Exception, attempt: int) -> float:
        response = getattr(error, "response", None)
        retry_after = _retry_after_seconds(getattr(response, "headers", None))
        if retry_after is not None:
            return min(retry_after, self.config.backoff_max_s * 10)
        base = min(self.config.backoff_max_s, self.config.backoff_initial_s * 2 ** attempt)
        # "Equal jitter": at least half the backoff, so clients that failed together spread out
        # without any of them retrying immediately.
        return base / 2 + self._jitter.uniform(0, base / 2)


def parse_completion(result: Any, api: str) -> tuple[str, str | None, int, int] | None:
    """Text, finish reason and usage, or None when the body is not a completion."""
    try:
        choice = result.choices[0]
        text = choice.message.content if api == "chat" else choice.text
        if not isinstance(text, str):
            return None
        usage = result.usage
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0) if usage else 0
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0) if usage else 0
        return text, choice.finish_reason, prompt_tokens, completion_tokens
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


def _classify(error: Exception) -> str:
    """'retry' (transient), 'garbage' (the server answered nonsense) or 'fail' (give up)."""
    if isinstance(error, (openai.APITimeoutError, openai.APIConnectionError)):
        return "retry"
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        return "retry" if status in _RETRY_STATUS or status >= 500 else "fail"
    if isinstance(error, (ValueError, openai.APIResponseValidationError)):
        return "garbage"  # e.g. JSONDecodeError from a 200 response that is not JSON
    return "fail"


def _retry_after_seconds(headers: Any) -> float | None:
    """Seconds the server asks us to wait, from a case-insensitive header mapping (or None)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]
