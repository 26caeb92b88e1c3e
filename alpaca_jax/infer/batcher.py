"""Shared decode batches for concurrent callers (the server's engine; no HTTP here).

One worker thread owns the model. Callers `submit` rows and get futures; the worker takes up to
`max_batch` waiting rows, decodes them together (one prefill, shared decode steps) and resolves
their futures. Rows that arrive while a batch runs wait for the next one. A short gathering
window after the first row lets clients that arrive together share a batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future

from alpaca_jax.infer.decode import Completion, Row, decode_rows
from alpaca_jax.infer.loader import LoadedModel

log = logging.getLogger("alpaca_jax")


class BatchingEngine:
    """Decode submitted rows in shared batches on one background thread."""

    def __init__(self, model: LoadedModel, max_batch: int = 16, gather_s: float = 0.01):
        self.model = model
        self.max_batch = max_batch      # rows decoded together at most
        self.gather_s = gather_s        # seconds to wait for companions after a row arrives idle
        self._waiting: deque[tuple[Row, Future]] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self.batches_run = 0            # how many batches were decoded (tests and benchmarks read it)
        self._thread = threading.Thread(target=self._work, name="alpaca-jax-decode", daemon=True)
        self._thread.start()

    def submit(self, row: Row) -> Future[Completion]:
        future: Future[Completion] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._waiting.append((row, future))
            self._lock.notify()
        return future

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    def _next_batch(self) -> list[tuple[Row, Future]]:
        with self._lock:
            while not self._waiting and not self._closed:
                self._lock.wait()
            if self._closed:
                return []
            deadline = time.monotonic() + self.gather_s
            while len(self._waiting) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self._lock.wait(left)
            return [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]

    def _work(self) -> None:
        while batch := self._next_batch():
            rows = [row for row, _ in batch]
            try:
                completions = decode_rows(self.model, rows, self.max_batch)
            except Exception as e:  # noqa: BLE001 - reported to every caller of the batch
                log.exception("decoding a batch of %d rows failed", len(rows))
                for _, future in batch:
                    future.set_exception(e)
                continue
            self.batches_run += 1
            for (_, future), completion in zip(batch, completions):
                future.set_result(completion)
        with self._lock:  # closed: nothing more will run
            for _, future in self._waiting:
                future.set_exception(RuntimeError("the engine was closed"))
            self._waiting.clear()
