"""Shared decode steps for concurrent callers (the server's engine; no HTTP here).

One worker thread owns the model and a `DecodeBatch`. Callers `submit` rows and get futures.
Between decode steps the worker admits waiting rows into free slots (continuous batching): a
request that arrives while others decode joins them at the next step instead of waiting for
the whole batch to finish. When the engine is idle, a short gathering window after the first
row lets clients that arrive together share one prefill.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future

from alpaca_jax.infer.decode import DecodeBatch, Row
from alpaca_jax.infer.loader import LoadedModel

log = logging.getLogger("alpaca_jax")


class BatchingEngine:
    """Decode submitted rows in shared steps on one background thread."""

    def __init__(self, model: LoadedModel, max_batch: int = 16, gather_s: float = 0.01):
        self.model = model
        self.max_batch = max_batch      # rows decoded together at most
        self.gather_s = gather_s        # seconds to wait for companions after a row arrives idle
        self._waiting: deque[tuple[Row, Future]] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self.shared_steps = 0           # decode steps that served two rows or more (tests read it)
        self._thread = threading.Thread(target=self._work, name="alpaca-jax-decode", daemon=True)
        self._thread.start()

    def submit(self, row: Row) -> Future:
        future: Future = Future()
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

    def _take(self, free: int, idle: bool) -> list[tuple[Row, Future]]:
        """Up to `free` waiting rows. Idle, wait for a first row and then for companions (the
        gathering window); busy, take only what is already waiting."""
        with self._lock:
            if idle:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                deadline = time.monotonic() + self.gather_s
                while (not self._closed and len(self._waiting) < free
                       and (left := deadline - time.monotonic()) > 0):
                    self._lock.wait(left)
            if self._closed:
                return []
            return [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]

    def _work(self) -> None:
        batch = DecodeBatch(self.model, self.max_batch)
        pending: dict[int, Future] = {}  # id(row) -> its caller's future
        while True:
            newcomers = self._take(batch.free, idle=not batch.live) if batch.free else []
            if self._closed:
                break
            if newcomers:
                try:
                    batch.admit([row for row, _ in newcomers])
                    pending.update((id(row), future) for row, future in newcomers)
                except Exception as e:  # noqa: BLE001 - reported to the callers whose rows failed
                    log.exception("admitting %d rows failed", len(newcomers))
                    for _, future in newcomers:
                        future.set_exception(e)
                    if not batch.live:
                        batch = DecodeBatch(self.model, self.max_batch)
            if not batch.live:
                continue
            if batch.live > 1:
                self.shared_steps += 1
            try:
                finished = batch.step()
            except Exception as e:  # noqa: BLE001 - the batch is lost: tell every caller in it
                log.exception("a decode step failed")
                for future in pending.values():
                    future.set_exception(e)
                pending.clear()
                batch = DecodeBatch(self.model, self.max_batch)
                continue
            for row, completion in finished:
                pending.pop(id(row)).set_result(completion)
        error = RuntimeError("the engine was closed")
        with self._lock:  # closed: nothing more will run
            for _, future in self._waiting:
                future.set_exception(error)
            self._waiting.clear()
        for future in pending.values():
            future.set_exception(error)
