"""`teacher.mode: batch`: each batch of requests goes through the OpenAI Batch API.

`BatchTeacher.complete(requests)` answers like `Teacher.complete` (teacher.py), but for the
requests the journal does not hold yet it:

1. writes them as Batch API JSONL (`custom_id` = the request's content id, `body` = exactly
   what the online client would send), uploads it (`/v1/files`, purpose "batch") and creates
   the batch (`/v1/batches`, metadata `alpaca_jax_batch` = the batch's own key);
2. journals the batch id *before* polling, in `batch_journal.jsonl` beside the journal;
3. polls until the batch ends (completed, expired, failed, cancelled), downloads the output
   and error files, and appends every answered row to the journal by `custom_id`, exactly as
   an online answer would be journaled (garbage included);
4. sends the rows the batch did not answer (expired, failed) online (`batch.retry: online`)
   or in a new batch (`next_batch`), at most `batch.max_attempts` batches in all.

A batch's key is a hash of the ids of *all* the requests of the call and the attempt number,
so a rerun after a kill (or a reboot days later) computes the same key, finds the batch id in
the batch journal and resumes polling that batch: it never submits a second one. A kill between
creating the batch and journaling its id is covered too: the key is journaled first (state
"submitting"), and a rerun that finds only that looks the batch up by its metadata before
submitting. Rows are ingested once: a row already in the journal is skipped.

The budget: each row sent in a batch is reserved like an online request (so `max_requests`
holds); rows are counted when replayed from the journal. Batch prices are usually half the
online ones: put them in `budget.prices`.

Not here: what to ask (the pipelines), the online client and its retries (teacher.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import openai
from openai.types import Completion
from openai.types.chat import ChatCompletion

from alpaca_jax.llm.budget import Budget
from data_gen.config import BatchConfig, TeacherConfig
from alpaca_jax.llm.journal import Journal
from alpaca_jax.llm.client import Request, Response, Teacher, TeacherFatalError, parse_completion, request_id

__all__ = ["BatchTeacher", "BATCH_JOURNAL", "batch_lines", "ingest_lines"]

BATCH_JOURNAL = "batch_journal.jsonl"
_RUNNING = ("validating", "in_progress", "finalizing", "cancelling")


def batch_lines(requests: list[Request], config: TeacherConfig) -> bytes:
    """The Batch API input file: one request per line, the body the online client sends."""
    url = "/v1/chat/completions" if config.api == "chat" else "/v1/completions"
    lines = []
    for request in requests:
        body: dict[str, Any] = {"model": config.model, **dict(request.params)}
        if config.api == "chat":
            body["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.prompt
        lines.append(json.dumps({"custom_id": request_id(request, config), "method": "POST",
                                 "url": url, "body": body}, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode("utf-8")


def ingest_lines(lines: bytes, by_id: dict[str, Request], journal: Journal, api: str,
                 batch_id: str) -> tuple[int, set[str]]:
    """Journal every answered row of an output file not journaled yet; (rows journaled now,
    custom_ids answered). A row for an unknown custom_id is ignored."""
    model = ChatCompletion if api == "chat" else Completion
    records, answered = [], set()
    for line in lines.splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        rid = row.get("custom_id")
        response = row.get("response") or {}
        if rid not in by_id or row.get("error") or response.get("status_code") != 200:
            continue
        seen = rid in journal or rid in answered
        answered.add(rid)
        if seen:
            continue
        try:
            raw = parse_completion(model.model_validate(response.get("body")), api)
        except (ValueError, TypeError):
            raw = None                           # a body that is not a completion: garbage
        text, finish, prompt_tokens, completion_tokens = raw or (None, None, 0, 0)
        records.append({"id": rid, "key": by_id[rid].key, "text": text, "finish_reason": finish,
                        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                        "batch_id": batch_id})
    journal.extend(records)     # one fsync for the whole file
    return len(records), answered


class BatchTeacher:
    def __init__(self, config: TeacherConfig, batch: BatchConfig, journal: Journal, budget: Budget,
                 client: openai.OpenAI | None = None, sleep: Callable[[float], None] = time.sleep):
        self.online = Teacher(config, journal, budget, client)
        self.config, self.batch = config, batch
        self.journal = journal
        self.batches = Journal(Path(journal.path).with_name(BATCH_JOURNAL))
        self.batch_stats = {"submitted": 0, "resumed": 0, "polls": 0, "rows_ingested": 0,
                            "rows_unanswered": 0, "retried_online": 0}
        self._sleep = sleep

    budget = property(lambda self: self.online.budget)
    stats = property(lambda self: self.online.stats)
    endpoint = property(lambda self: self.online.endpoint)
    last_error = property(lambda self: self.online.last_error)

    def close(self) -> None:
        self.batches.close()

    def complete(self, requests: list[Request],
                 on_done: Callable[[], None] | None = None) -> dict[str, Response | None]:
        by_id = {request_id(r, self.config): r for r in requests}
        key = hashlib.sha256(" ".join(sorted(by_id)).encode()).hexdigest()[:32]
        missing = [r for rid, r in by_id.items() if rid not in self.journal]
        attempt = 0
        while missing and attempt < self.batch.max_attempts:
            missing = self._one_batch(f"{key}/{attempt}", missing, by_id)
            attempt += 1
            if self.batch.retry == "online":
                break
        done = [r for r in requests if request_id(r, self.config) in self.journal]
        results = self.online.complete(done, on_done)          # replayed: counts the budget
        if missing and self.batch.retry == "online":
            self.batch_stats["retried_online"] += len(missing)
            results.update(self.online.complete(missing, on_done))
        elif missing:
            self.batch_stats["rows_unanswered"] += len(missing)
            results.update({r.key: None for r in missing})      # failed: a rerun asks again
        return results

    def _one_batch(self, key: str, requests: list[Request], by_id: dict[str, Request]) -> list[Request]:
        """Submit (or resume) one batch and ingest it; the requests it left unanswered."""
        record = self.batches.get(key)
        batch_id = record.get("batch_id") if record else None
        if batch_id is None and record is not None:
            batch_id = self._find_submitted(key)
        if batch_id is None:
            batch_id = self._submit(key, requests)
            if batch_id is None:
                return []                                       # the budget allowed none of them
        else:
            self.batch_stats["resumed"] += 1
        batch = self._wait(batch_id)
        answered: set[str] = set()
        for file_id in (batch.output_file_id,):
            if file_id:
                added, got = ingest_lines(self.online.client.files.content(file_id).read(), by_id,
                                          self.journal, self.config.api, batch_id)
                self.batch_stats["rows_ingested"] += added
                answered |= got
        if batch.error_file_id:
            errors = self.online.client.files.content(batch.error_file_id).read()
            self.online.last_error = f"batch {batch_id}: " + _error_summary(errors)
        return [r for r in requests if request_id(r, self.config) not in answered
                and request_id(r, self.config) not in self.journal]

    def _submit(self, key: str, requests: list[Request]) -> str | None:
        allowed = []
        for request in requests:
            if not self.online.budget.reserve():
                break
            allowed.append(request)
        if not allowed:
            return None
        # Rows are counted when replayed from the journal, not here: release the claims.
        for _ in allowed:
            self.online.budget.release()
        self.batches.append({"id": key, "state": "submitting"})
        client = self.online.client
        try:
            upload = client.files.create(file=("batch.jsonl", batch_lines(allowed, self.config)),
                                         purpose="batch")
            batch = client.batches.create(
                input_file_id=upload.id, completion_window=self.batch.completion_window,
                endpoint="/v1/chat/completions" if self.config.api == "chat" else "/v1/completions",
                metadata={"alpaca_jax_batch": key})
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError,
                openai.BadRequestError) as e:
            raise TeacherFatalError(f"the Batch API refused the batch: {' '.join(str(e).split())[:300]}") from None
        self.batches.append({"id": key, "state": "submitted", "batch_id": batch.id,
                             "input_file_id": upload.id, "rows": len(allowed)})
        self.batch_stats["submitted"] += 1
        return batch.id

    def _find_submitted(self, key: str) -> str | None:
        """A batch created by a run killed before it could journal the id, found by metadata."""
        for batch in self.online.client.batches.list(limit=100):
            if (batch.metadata or {}).get("alpaca_jax_batch") == key:
                self.batches.append({"id": key, "state": "submitted", "batch_id": batch.id,
                                     "input_file_id": batch.input_file_id})
                return batch.id
        return None

    def _wait(self, batch_id: str):
        started = time.time()
        while True:
            batch = self.online.client.batches.retrieve(batch_id)
            self.batch_stats["polls"] += 1
            if batch.status not in _RUNNING:
                return batch
            waited = time.time() - started
            if self.batch.max_wait_s is not None and waited > self.batch.max_wait_s:
                raise TeacherFatalError(
                    f"batch {batch_id} still {batch.status} after {waited:.0f} s (batch.max_wait_s); "
                    "its id is journaled: rerun the same command to resume polling it")
            self._sleep(self.batch.poll_interval_s)


def _error_summary(lines: bytes) -> str:
    codes: dict[str, int] = {}
    for line in lines.splitlines():
        if line.strip():
            error = json.loads(line).get("error") or {}
            codes[error.get("code", "unknown")] = codes.get(error.get("code", "unknown"), 0) + 1
    return ", ".join(f"{n} rows {code}" for code, n in sorted(codes.items()))
