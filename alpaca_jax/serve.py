"""An OpenAI-compatible HTTP server over `alpaca_jax.infer` (Starlette + Uvicorn).

Endpoints: `GET /` (the chat page, alpaca_jax/web/chat.html; off with `ui=False`),
`GET /health` (503 once the decode engine has failed), `GET /v1/models`,
`POST /v1/completions`, `POST /v1/chat/completions`, with
`stream=true` (server-sent events as the `openai` client reads them), `n`, `stop`,
`max_tokens`, `temperature`, `top_p`, `seed` and `usage`. Requests are decoded by one
`BatchingEngine`: concurrent requests share decode steps. Chat messages become prompt ids
through the prompt owner (`data/prompt.py`): the run's chat template, as training rendered it;
a conversation of several exchanges sent to a single-turn (Alpaca) model is a 400.

Bad requests get a 400 with an OpenAI-style body `{"error": {"message", "type", "param",
"code"}}`. Fields the server does not implement but clients commonly send (presence and
frequency penalties, user, ...) are accepted and ignored when they have the right type.
Not here: decoding (infer/), the command line (cli.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.resources
import json
import logging
import os
import secrets
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from alpaca_jax.configlib import ConfigError
from alpaca_jax.errors import UserError
from alpaca_jax.data.prompt import PromptError, PromptTooLongError, check_fits
from alpaca_jax.infer import LoadedModel, Row, SamplingConfig
from alpaca_jax.infer.batcher import BatchingEngine, EngineFailed

log = logging.getLogger("alpaca_jax")

MAX_CHOICES = 16  # largest `n` one request may ask for
# The page may talk to this server only: a stray link or script cannot send the conversation
# (or the API key) anywhere else.
_PAGE_POLICY = ("default-src 'none'; connect-src 'self'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; form-action 'none'")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """How the server listens and batches."""
    host: str = "127.0.0.1"            # interface to bind; 127.0.0.1 keeps it off the network
    port: int = 8000                   # TCP port
    model_name: str | None = None      # the name clients must send as `model`; default the run's name
    api_key: str | None = None         # when set, requests need `Authorization: Bearer <key>`
    max_batch: int = 16                # rows decoded together at most
    gather_ms: float = 10.0            # milliseconds an idle engine waits for more requests to batch
    ui: bool = True                    # serve the chat page at `/` (`--no-ui` turns it off)


class RequestError(UserError, ValueError):
    """A request the server refuses; becomes a 400 (or `status`) with an OpenAI error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def _error_response(message: str, status: int = 400, param: str | None = None, code: str | None = None,
                    kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


# -- request fields -------------------------------------------------------------------------

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
               list: "an array", dict: "an object"}


def _field(body: dict, name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    """body[name] checked to be one of `kinds` (null means the default). bool is not a number."""
    value = body.get(name)
    if value is None:
        return default
    is_bool = isinstance(value, bool)
    ok = any((kind is bool and is_bool) or (kind is not bool and not is_bool and isinstance(value, kind))
             or (kind is float and not is_bool and isinstance(value, int)) for kind in kinds)
    if not ok:
        wanted = " or ".join(_TYPE_NAMES[k] for k in kinds)
        raise RequestError(f"'{name}' must be {wanted}, got {json.dumps(value)[:40]}", param=name,
                           code="invalid_type")
    return value


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or any(not isinstance(s, str) or not s for s in stop):
        raise RequestError("'stop' must be a non-empty string or an array of up to 4 of them", param="stop")
    return tuple(stop)


def _sampling(body: dict, default_max_tokens: int, remaining: int) -> tuple[list[SamplingConfig], bool]:
    """One SamplingConfig per choice (`n` of them, seeds seed, seed+1, ...), and `stream`."""
    for ignored in ("presence_penalty", "frequency_penalty"):
        _field(body, ignored, (float,))
    _field(body, "user", (str,))
    max_tokens = _field(body, "max_tokens", (int,), None)
    max_tokens = _field(body, "max_completion_tokens", (int,), max_tokens)
    if max_tokens is not None and max_tokens < 1:
        raise RequestError("'max_tokens' must be at least 1", param="max_tokens")
    n = _field(body, "n", (int,), 1)
    if not 1 <= n <= MAX_CHOICES:
        raise RequestError(f"'n' must be between 1 and {MAX_CHOICES}", param="n")
    temperature = _field(body, "temperature", (float,), 1.0)
    top_p = _field(body, "top_p", (float,), 1.0)
    top_k = _field(body, "top_k", (int,), 0)
    seed = _field(body, "seed", (int,), None)
    seed = secrets.randbits(31) if seed is None else seed
    stream = _field(body, "stream", (bool,), False)
    stop = _stop_strings(body)
    try:
        configs = [SamplingConfig(max_new_tokens=min(max_tokens or default_max_tokens, remaining),
                                  temperature=float(temperature), top_k=top_k, top_p=float(top_p),
                                  seed=seed + i, stop=stop) for i in range(n)]
    except ValueError as e:
        raise RequestError(str(e)) from None
    return configs, stream


# -- the app --------------------------------------------------------------------------------

class _Server:
    """Endpoint handlers around one model and its batching engine."""

    def __init__(self, model: LoadedModel, engine: BatchingEngine, cfg: ServeConfig):
        self.model, self.engine, self.cfg = model, engine, cfg
        self.name = cfg.model_name or model.name
        self.created = int(time.time())

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": self.created, "owned_by": "alpaca-jax"}]})

    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self._handle(request, chat=True)

    async def _handle(self, request: Request, chat: bool):
        try:
            body = await _json_body(request)
            prompt_ids = await asyncio.to_thread(self._prompt_ids, body, chat)
            remaining = self.model.max_len - len(prompt_ids)
            # OpenAI's defaults: 16 tokens for completions, as many as fit for chat.
            samplings, stream = _sampling(body, remaining if chat else 16, remaining)
        except RequestError as e:
            return _error_response(str(e), e.status, e.param, e.code)
        except PromptError as e:
            return _error_response(str(e), param="messages" if chat else "prompt",
                                   code="context_length_exceeded" if isinstance(e, PromptTooLongError) else None)
        include_usage = bool(isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage"))
        reply = _Reply(chat, self.name, len(prompt_ids))
        if stream:
            return StreamingResponse(self._stream(reply, prompt_ids, samplings, include_usage),
                                     media_type="text/event-stream")
        if not self.engine.healthy:
            return _unhealthy(self.engine)
        futures = [asyncio.wrap_future(self.engine.submit(Row(prompt_ids, s))) for s in samplings]
        answers = asyncio.gather(*futures)
        hangup = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({answers, hangup}, return_when=asyncio.FIRST_COMPLETED)
        if not answers.done():  # the client left: cancelling the futures frees the rows' slots
            answers.cancel()
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        hangup.cancel()
        try:
            completions = answers.result()
        except EngineFailed:
            return _unhealthy(self.engine)
        return JSONResponse(reply.whole(completions))

    async def health(self, request: Request) -> JSONResponse:
        """200 while the decode engine runs; 503 (with the reason) once it has failed."""
        if not self.engine.healthy:
            return _unhealthy(self.engine)
        return JSONResponse({"status": "ok"})

    def _prompt_ids(self, body: dict, chat: bool) -> list[int]:
        """The request's prompt ids: a chat through the prompt owner (the run's template, as
        training rendered it), a raw completion prompt as given (BOS as in training)."""
        model = _field(body, "model", (str,))
        if model is None:
            raise RequestError("'model' is required", param="model", code="missing_required_parameter")
        if model != self.name:  # OpenAI answers an unknown model with a 404 `model_not_found`
            raise RequestError(f"The model `{model}` does not exist; this server serves '{self.name}'",
                               param="model", code="model_not_found", status=404)
        if not chat:
            prompt = _field(body, "prompt", (str, list))
            if isinstance(prompt, list):
                if len(prompt) != 1 or not isinstance(prompt[0], str):
                    raise RequestError("'prompt' must be a string (or an array of exactly one string)",
                                       param="prompt")
                prompt = prompt[0]
            if prompt is None:
                raise RequestError("'prompt' is required", param="prompt", code="missing_required_parameter")
            ids = self.model.encode(prompt)
            check_fits(ids, self.model.max_len)
            return ids
        messages = _field(body, "messages", (list,))
        if not messages or any(not isinstance(m, dict) or not isinstance(m.get("content"), str) for m in messages):
            raise RequestError("'messages' must be a non-empty array of {role, content} objects with "
                               "string content", param="messages")
        return self.model.encode_messages(messages)

    async def _stream(self, reply: "_Reply", prompt_ids: list[int], samplings: list[SamplingConfig],
                      include_usage: bool):
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()  # set when the client disconnects: the rows stop decoding

        def listener(index: int):
            def on_text(piece: str) -> bool:
                loop.call_soon_threadsafe(pieces.put_nowait, (index, piece))
                return not gone.is_set()
            return on_text

        try:
            futures = [asyncio.wrap_future(self.engine.submit(Row(prompt_ids, s, listener(i))))
                       for i, s in enumerate(samplings)]
        except EngineFailed as e:
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'code': 'engine_failed'}})}\n\n"
            return
        for i, future in enumerate(futures):
            # The end of row i, queued behind its text: the engine hands over every piece
            # (call_soon_threadsafe) before it resolves the row's future.
            future.add_done_callback(lambda _, i=i: pieces.put_nowait((i, None)))
        try:
            for index in range(len(samplings)):
                yield reply.chunk(index, "", None, first=True)
            open_rows = set(range(len(samplings)))
            finished: dict[int, Any] = {}
            while open_rows:
                # Everything queued since the last chunk goes out together, one chunk per row:
                # a slow client gets fewer, longer chunks instead of a growing backlog.
                items = [await pieces.get()]
                while not pieces.empty():
                    items.append(pieces.get_nowait())
                texts: dict[int, str] = {}
                ended = []
                for index, piece in items:
                    if piece is None:
                        ended.append(index)
                    else:
                        texts[index] = texts.get(index, "") + piece
                for index, text in texts.items():
                    yield reply.chunk(index, text, None)
                for i in ended:
                    if futures[i].exception() is not None:  # the engine failed mid-stream
                        error = {"message": str(futures[i].exception()), "type": "server_error"}
                        yield f"data: {json.dumps({'error': error})}\n\n"
                        return
                    finished[i] = futures[i].result()
                    open_rows.discard(i)
                    yield reply.chunk(i, "", finished[i].finish_reason)
            if include_usage:
                yield reply.usage_chunk([finished[i] for i in sorted(finished)])
            yield "data: [DONE]\n\n"
        finally:
            gone.set()
            for future in futures:
                future.cancel()  # rows still decoding for a client that left are dropped


def _unhealthy(engine: BatchingEngine) -> JSONResponse:
    return _error_response(engine.error or "the decode engine is not running", 503, kind="server_error",
                           code="engine_failed")


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body has been read: the next ASGI message is the
    disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    return body


class _Reply:
    """OpenAI response bodies and stream chunks for one request."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int):
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _usage(self, completions) -> dict:
        generated = sum(len(c.token_ids) for c in completions)
        # Each of n choices re-reads the prompt, as OpenAI bills it once per request.
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": generated,
                "total_tokens": self.prompt_tokens + generated}

    def whole(self, completions) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                        "finish_reason": c.finish_reason, "logprobs": None} for i, c in enumerate(completions)]
        else:
            choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                       for i, c in enumerate(completions)]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": self._usage(completions)}

    def chunk(self, index: int, text: str, finish_reason: str | None, first: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        elif first:
            return ""  # completions streams have no role chunk
        else:
            choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return self._event({"choices": [choice]})

    def usage_chunk(self, completions) -> str:
        return self._event({"choices": [], "usage": self._usage(completions)})

    def _event(self, fields: dict) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, **fields}
        return f"data: {json.dumps(body)}\n\n"


def chat_page() -> str:
    """The chat page's HTML (package data)."""
    return (importlib.resources.files("alpaca_jax") / "web" / "chat.html").read_text(encoding="utf-8")


class _Guard:
    """ASGI middleware: the API key, and a JSON 500 (never a traceback) for anything unexpected.
    The chat page itself is public (it holds no data): it is what asks for the key."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key is not None and scope["path"] != "/":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}"):
                response = _error_response("missing or wrong API key (send 'Authorization: Bearer <key>')",
                                           401, code="invalid_api_key")
                return await response(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            # A client that hung up (the chat page's Stop): normal, nothing to answer. Uvicorn
            # today (ASGI 2.3) cancels the stream instead; servers speaking ASGI 2.4 raise this.
            log.debug("client disconnected from %s", scope["path"])
        except Exception:  # noqa: BLE001 - logged here, answered as JSON
            log.exception("request failed")
            if not started:
                await _error_response("internal server error", 500, kind="server_error")(scope, receive, send)


def make_app(model: LoadedModel, cfg: ServeConfig = ServeConfig(), engine: BatchingEngine | None = None) -> Starlette:
    """The ASGI app. The engine (made here if not given) is closed when the app shuts down."""
    engine = engine or BatchingEngine(model, cfg.max_batch, cfg.gather_ms / 1000)
    server = _Server(model, engine, cfg)

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        status = getattr(exc, "status_code", 404)
        return _error_response(f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')}",
                               status, code="not_found")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.close)

    routes = [Route("/health", server.health, methods=["GET"]),
              Route("/v1/models", server.models, methods=["GET"]),
              Route("/v1/completions", server.completions, methods=["POST"]),
              Route("/v1/chat/completions", server.chat_completions, methods=["POST"])]
    if cfg.ui:
        page = chat_page()

        async def index(request: Request) -> HTMLResponse:
            return HTMLResponse(page, headers={"Content-Security-Policy": _PAGE_POLICY, "Cache-Control": "no-cache"})
        routes.append(Route("/", index, methods=["GET"]))
    app = Starlette(routes=routes,
                    middleware=[Middleware(_Guard, api_key=cfg.api_key)],
                    exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)
    app.state.engine = engine
    return app


def api_key_from_env(name: str | None) -> str | None:
    if name is None:
        return None
    key = os.environ.get(name)
    if not key:
        raise ConfigError(f"--api-key-env {name}: the environment variable {name} is not set or empty")
    return key


class ServerThread:
    """Uvicorn serving `app` on a background thread (tests, benchmarks, notebooks).

    `with ServerThread(app, port=0) as server: server.base_url` — port 0 picks a free port.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                     lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, name="alpaca-jax-serve", daemon=True)
        self.host = host

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + 120
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server failed to start")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://{self.host}:{self.port}/v1"
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        if self._thread.is_alive():  # a request that never ends would hold a graceful exit forever
            self._server.force_exit = True
            self._thread.join(timeout=30)
        if self._thread.is_alive():
            raise RuntimeError("the server thread did not stop within 60 s")


def serve(source: str, cfg: ServeConfig = ServeConfig()) -> None:
    """Load the model and serve it until interrupted (what `alpaca-jax serve` runs)."""
    from alpaca_jax.infer import load_model
    model = load_model(source)
    app = make_app(model, cfg)
    log.info("serving %s as '%s' on http://%s:%d/v1 (context %d tokens)%s", source,
             cfg.model_name or model.name, cfg.host, cfg.port, model.max_len,
             f"; chat page at http://{cfg.host}:{cfg.port}/" if cfg.ui else "")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
