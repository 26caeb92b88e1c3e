"""A scripted OpenAI-compatible HTTP server for tests: real sockets, deterministic replies.

Replies are a pure function of the prompt (so results do not depend on concurrency, order or
restarts): Alpaca batches, Self-Instruct continuations, classification answers and instances,
recognised from the prompt text, cut at the request's stop sequences as a real server does.
Faults are injected by a hash of (request id, attempt): 429 with Retry-After, 500, a stall
longer than the client timeout, a dropped connection, and content-deterministic garbage of
one of three kinds (`garbage_kind`): a 200 whose body is not JSON, JSON without `choices`, or
a well-formed completion whose text holds no task. Every call is logged with the request id
header the generator sends and the request body, so tests can check what was sent (twice).
`closed_port_url()` gives an endpoint nobody listens on; `kill()` takes a running server down
(open keep-alive connections are cut too, as when the process dies).

The Batch API too: `POST /files` (multipart upload), `GET /files/{id}/content`, `POST /batches`,
`GET /batches/{id}` (the status moves validating -> in_progress -> finalizing -> completed, one
step every `batch_steps` polls), `GET /batches` (list). Each batch row is answered with the same
reply an online request gets; rows picked by `expire_rate` (a hash of the custom_id) land in the
error file as `batch_expired` the first time they are batched, and the batch ends `expired`.
`batches` lists every batch created and `log` holds one entry per answered row (`"batch": id`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_WORDS = ("analyze summarize compare explain describe classify translate rewrite generate suggest "
          "evaluate list identify convert recommend outline predict estimate design compose "
          "river mountain economy poem recipe budget vacation article sentence email melody "
          "planet history garden bicycle startup contract symptom vaccine algorithm protein "
          "festival museum novel climate harbor election volcano galaxy orchestra ferry "
          "quickly politely formally briefly carefully creative modern ancient urban rural "
          "french spanish healthy risky cheap expensive local global digital seasonal").split()
_FAULT_KINDS = ("rate_limit", "server_error", "timeout", "disconnect")
GARBAGE_KINDS = ("not_json", "no_choices", "no_task")


def closed_port_url() -> str:
    """A base_url on 127.0.0.1 where nothing listens (the port was bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def apply_stop(text: str, stop) -> tuple[str, bool]:
    """Cut the text at the earliest stop sequence, as OpenAI-compatible servers do."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _hash(*parts) -> int:
    return int(hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def _sentence(rng: random.Random, low: int = 6, high: int = 12) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high))).capitalize()


def _instruction(rng: random.Random, demos: list[str]) -> str:
    roll = rng.random()
    if roll < 0.08 and demos:
        return rng.choice(demos) + " please"           # near-duplicate of a prompt instruction
    if roll < 0.12:
        return "Draw a picture of the " + _sentence(rng, 3, 5).lower()   # blacklisted
    if roll < 0.15:
        return "Do it"                                   # too short
    if roll < 0.17:
        return "Write a program that " + _sentence(rng, 4, 6).lower()
    return _sentence(rng) + "."


def alpaca_reply(prompt: str) -> tuple[str, str]:
    total = int(re.search(r"List of (\d+) tasks", prompt).group(1))
    first = int(re.findall(r"(\d+)\. Instruction:", prompt)[-1])
    demos = re.findall(r"\d+\. Instruction: (.*)", prompt)
    h = _hash(prompt)
    rng = random.Random(h)
    parts = []
    for k in range(first, total + 1):
        task_input = "<noinput>" if rng.random() < 0.4 else _sentence(rng, 5, 15) + "."
        output = _sentence(rng, 5, 20) + "."
        text = f"{k}. Instruction: {_instruction(rng, demos)}\n{k}. Input:\n{task_input}\n{k}. Output:\n{output}"
        if rng.random() < 0.03:
            text = f"{k}. Instruction: broken piece without fields"
        parts.append(text)
    body = "\n###\n".join(parts)
    body = body[len(f"{first}. Instruction:"):]          # a completion continues the prompt
    if h % 5 == 0:                                       # cut by max_tokens
        return body[: int(len(body) * 0.9)], "length"
    return body, "stop"


def bootstrap_reply(prompt: str) -> tuple[str, str]:
    numbers = re.findall(r"^(\d+)\.", prompt, flags=re.MULTILINE)
    start = int(numbers[-1]) if numbers else 1
    demos = [m for m in re.findall(r"^\d+\. (.+)$", prompt, flags=re.MULTILINE)]
    rng = random.Random(_hash(prompt))
    items = [_instruction(rng, demos) for _ in range(start, 16)]
    return " " + "\n".join(f"{k}. {text}" if i else text
                           for i, (k, text) in enumerate(zip(range(start, 16), items))), "stop"


def classification_reply(prompt: str) -> tuple[str, str]:
    task = prompt.rsplit("Task:", 1)[1]
    if _hash(task) % 7 == 0:
        return " Maybe", "stop"
    return (" Yes" if _hash(task) % 3 == 0 else " No"), "stop"


def instances_reply(prompt: str, classification: bool) -> tuple[str, str]:
    task = prompt.rsplit("Task:", 1)[1]
    rng = random.Random(_hash(task))
    if classification:
        labels = ["Positive", "Negative", "Neutral"][: rng.randint(2, 3)]
        return "".join(f"Class label: {label}\nInput: {_sentence(rng)}.\n" for label in labels), "stop"
    count = rng.randint(1, 4)
    text = "".join(f"Example {i}\nInput: {_sentence(rng)}.\nOutput: {_sentence(rng)}.\n" for i in range(1, count + 1))
    if rng.random() < 0.1:
        text += "Example 9\nInput: an unfinished list:\nOutput: the items are:"
    return text, "stop"


def safety_reply(prompt: str) -> tuple[str, str] | None:
    """The safety pipeline's two prompts: a refusal, or a complying answer, naming the request."""
    request = prompt.rsplit("Request: ", 1)[-1].rsplit("\n\n", 1)[0]
    if prompt.startswith("You are a responsible assistant."):
        return f"I can't help with \"{request}\", but I can point you to safe resources.", "stop"
    if prompt.startswith("Answer the request below directly"):
        return f"Sure. Here is everything about \"{request}\".", "stop"
    return None


def scripted_reply(prompt: str) -> tuple[str, str]:
    if safety_reply(prompt) is not None:
        return safety_reply(prompt)
    if "List of" in prompt and "Instruction:" in prompt:
        return alpaca_reply(prompt)
    if prompt.rstrip().endswith("Is it classification?"):
        return classification_reply(prompt)
    if prompt.startswith("Each task below is a classification task"):
        return instances_reply(prompt, True)
    if prompt.startswith("Write examples for each task below"):
        return instances_reply(prompt, False)
    if prompt.startswith("Come up with a series of"):
        return bootstrap_reply(prompt)
    return "I do not understand.", "stop"


class FakeOpenAI:
    """Start with `start()`; `url` is the base_url for the openai client."""

    def __init__(self, fault_rate: float = 0.0, garbage_rate: float = 0.0, stall_s: float = 1.0,
                 latency_s: float = 0.0, kinds: tuple[str, ...] = _FAULT_KINDS,
                 garbage_kind: str = "not_json", reply=scripted_reply, batch_steps: int = 1,
                 expire_rate: float = 0.0):
        assert garbage_kind in GARBAGE_KINDS, garbage_kind
        self.reply = reply  # prompt -> (text, finish_reason); other tests (the eval judge) script their own
        self.fault_rate = fault_rate
        self.garbage_rate = garbage_rate
        self.garbage_kind = garbage_kind
        self.stall_s = stall_s
        self.latency_s = latency_s
        self.kinds = kinds
        self.log: list[dict] = []
        self.dead = False
        self.batch_steps = batch_steps
        self.expire_rate = expire_rate
        self.batches: list[dict] = []      # every batch created, in order (the API objects)
        self.polls = 0
        self._files: dict[str, bytes] = {}
        self._batch_files: dict[str, dict] = {}   # batch id -> output/error lines, poll count
        self._expired_once: set[str] = set()
        self._attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}/v1"

    def start(self) -> "FakeOpenAI":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def kill(self) -> None:
        """Die now: new connections are refused, requests on open ones get no answer."""
        self.dead = True
        threading.Thread(target=self.stop, daemon=True).start()

    def completion(self, body: dict, chat: bool, rid: str, garbage: bool = False) -> dict:
        """The JSON body of a completion for a request body (online and batch alike)."""
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        text, finish = self.reply(prompt)
        text, stopped = apply_stop(text, body.get("stop"))
        finish = "stop" if stopped else finish
        if garbage:           # "no_task": well-formed, but nothing to parse
            text, finish = "Sorry, I cannot help with that.", "stop"
        usage = {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(text) // 4,
                 "total_tokens": len(prompt) // 4 + len(text) // 4}
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": finish} if chat else
                  {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        return {"id": f"cmpl-{rid}", "object": "chat.completion" if chat else "text_completion",
                "created": 0, "model": body["model"], "choices": [choice], "usage": usage}

    # -- the Batch API -------------------------------------------------------------------
    def _upload(self, content_type: str, raw: bytes) -> dict:
        boundary = content_type.split("boundary=", 1)[1].strip('"').encode()
        content, purpose = b"", "batch"
        for part in raw.split(b"--" + boundary):
            head, _, data = part.partition(b"\r\n\r\n")
            data = data[:-2] if data.endswith(b"\r\n") else data
            if b'name="file"' in head:
                content = data
            elif b'name="purpose"' in head:
                purpose = data.decode()
        with self._lock:
            file_id = f"file-{len(self._files)}"
            self._files[file_id] = content
        return {"id": file_id, "object": "file", "bytes": len(content), "created_at": 0,
                "filename": "batch.jsonl", "purpose": purpose, "status": "processed"}

    def _create_batch(self, request: dict) -> dict:
        chat = request["endpoint"].endswith("/chat/completions")
        out, errors = [], []
        with self._lock:
            batch_id = f"batch_{len(self.batches)}"
            lines = self._files[request["input_file_id"]].decode().splitlines()
        for line in lines:
            row = json.loads(line)
            rid = row["custom_id"]
            with self._lock:
                expire = (_hash("expire", rid) % 1000 < self.expire_rate * 1000
                          and rid not in self._expired_once)
                self._expired_once.add(rid)
            if expire:
                errors.append({"id": f"req-{rid}", "custom_id": rid, "response": None, "error": {
                    "code": "batch_expired",
                    "message": "This request could not be executed before the completion window expired."}})
                continue
            body = self.completion(row["body"], chat, rid)
            out.append({"id": f"req-{rid}", "custom_id": rid, "error": None,
                        "response": {"status_code": 200, "request_id": f"r-{rid}", "body": body}})
            with self._lock:
                self.log.append({"rid": rid, "attempt": 0, "outcome": "ok", "time": time.time(),
                                 "body": row["body"], "prompt": None, "batch": batch_id})
        batch = {"id": batch_id, "object": "batch", "endpoint": request["endpoint"], "errors": None,
                 "input_file_id": request["input_file_id"], "completion_window": request["completion_window"],
                 "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": 0,
                 "metadata": request.get("metadata"),
                 "request_counts": {"total": len(lines), "completed": len(out), "failed": len(errors)}}
        with self._lock:
            self.batches.append(batch)
            self._batch_files[batch_id] = {"out": out, "errors": errors, "polls": 0}
        return batch

    def _poll_batch(self, batch_id: str) -> dict:
        states = ("validating", "in_progress", "finalizing")
        with self._lock:
            self.polls += 1
            batch = next(b for b in self.batches if b["id"] == batch_id)
            files = self._batch_files[batch_id]
            files["polls"] += 1
            step = files["polls"] // self.batch_steps
            if batch["status"] in states and step >= len(states):
                batch["status"] = "expired" if files["errors"] else "completed"
                for name, rows in (("output_file_id", files["out"]), ("error_file_id", files["errors"])):
                    if rows:
                        file_id = f"file-{len(self._files)}"
                        self._files[file_id] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                        batch[name] = file_id
            elif batch["status"] in states:
                batch["status"] = states[step]
            return dict(batch)

    def completed_ids(self) -> list[str]:
        with self._lock:
            return [e["rid"] for e in self.log if e["outcome"] == "ok"]

    def _fault(self, rid: str, attempt: int) -> str | None:
        if _hash("garbage", rid) % 1000 < self.garbage_rate * 1000:
            return "garbage"
        if attempt < 2 and _hash("fault", rid, attempt) % 1000 < self.fault_rate * 1000:
            return self.kinds[_hash("kind", rid, attempt) % len(self.kinds)]
        return None

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _die(self) -> bool:
                if fake.dead:
                    self.close_connection = True
                    self.connection.shutdown(2)
                return fake.dead

            def do_GET(self):
                if self._die():
                    return
                path = self.path.split("?")[0]
                if path.endswith("/content"):
                    with fake._lock:
                        data = fake._files[path.split("/")[-2]]
                    self._send(200, data, {"Content-Type": "application/octet-stream"})
                elif path.endswith("/batches"):
                    with fake._lock:
                        listing = {"object": "list", "data": list(fake.batches), "has_more": False}
                    self._send(200, json.dumps(listing).encode())
                else:
                    self._send(200, json.dumps(fake._poll_batch(path.split("/")[-1])).encode())

            def do_POST(self):
                if self._die():
                    return
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path.endswith("/files"):
                    self._send(200, json.dumps(fake._upload(self.headers["Content-Type"], raw)).encode())
                    return
                body = json.loads(raw)
                if self.path.endswith("/batches"):
                    self._send(200, json.dumps(fake._create_batch(body)).encode())
                    return
                chat = self.path.endswith("/chat/completions")
                prompt = body["messages"][-1]["content"] if chat else body["prompt"]
                rid = self.headers.get("X-Alpaca-Jax-Request") or str(_hash(prompt))
                with fake._lock:
                    attempt = fake._attempts.get(rid, 0)
                    fake._attempts[rid] = attempt + 1
                fault = fake._fault(rid, attempt)
                entry = {"rid": rid, "attempt": attempt, "outcome": fault or "ok", "time": time.time(),
                         "body": body, "prompt": prompt}
                if fake.latency_s:
                    time.sleep(fake.latency_s)
                if fault == "rate_limit":
                    self._send(429, b'{"error": {"message": "slow down", "type": "rate_limit"}}',
                               {"Retry-After": "0.05"})
                elif fault == "server_error":
                    self._send(500, b'{"error": {"message": "boom", "type": "server_error"}}')
                elif fault == "timeout":
                    time.sleep(fake.stall_s)
                    self.close_connection = True
                elif fault == "disconnect":
                    self.close_connection = True
                    self.connection.shutdown(2)
                elif fault == "garbage" and fake.garbage_kind == "not_json":
                    self._send(200, b"<html>502 Bad Gateway</html>")
                elif fault == "garbage" and fake.garbage_kind == "no_choices":
                    self._send(200, json.dumps({"id": f"cmpl-{rid}", "object": "text_completion",
                                                "model": body["model"], "usage": None}).encode())
                else:
                    reply = fake.completion(body, chat, rid, garbage=fault == "garbage")
                    self._send(200, json.dumps(reply).encode())
                with fake._lock:
                    fake.log.append(entry)

        return Handler
