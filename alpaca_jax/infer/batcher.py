"""Shared decode steps for concurrent callers (the server's engine; no HTTP here).

One worker thread owns the model and a `DecodeBatch`. Callers `submit` rows and get futures.
Between decode steps the worker admits waiting rows into free slots (continuous batching): a
request that arrives while others decode joins them at the next step instead of waiting for
the whole batch to finish. When the engine is idle, a short gathering window after the first
row lets clients that arrive together share one prefill.

Failure rules: a caller may cancel its future at any time (a client that went away); the row is
then dropped from the batch at the next step and its future is never touched again. The worker
thread cannot die silently: anything that escapes the loop fails every waiting and decoding
row's future, marks the engine unhealthy (`error`), and later `submit`s raise at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError

from alpaca_jax.infer.decode import DecodeBatch, Row
from alpaca_jax.infer.loader import LoadedModel

log = logging.getLogger("alpaca_jax")


class EngineFailed(RuntimeError):
    """The decode thread died; the server reports itself unhealthy."""


class BatchingEngine:
    """Decode submitted rows in shared steps on one background thread."""

    def __init__(self, model: LoadedModel, max_batch: int = 16, gather_s: float = 0.01):
        self.model = model
        self.max_batch = max_batch      # rows decoded together at most
        self.gather_s = gather_s        # seconds to wait for companions after a row arrives idle
        self._waiting: deque[tuple[Row, Future]] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self.error: str | None = None   # why the worker thread died (the engine is then unhealthy)
        self.shared_steps = 0           # decode steps that served two rows or more (tests read it)
        self.dropped = 0                # rows dropped because their caller cancelled
        self._thread = threading.Thread(target=self._work, name="alpaca-jax-decode", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def submit(self, row: Row) -> Future:
        future: Future = Future()
        with self._lock:
            if self.error is not None:
                raise EngineFailed(self.error)
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
        pending: dict[int, tuple[Row, Future]] = {}  # id(row) -> the row and its caller's future
        try:
            self._loop(pending)
            error: BaseException = RuntimeError("the engine was closed")
        except BaseException as e:  # noqa: BLE001 - the thread must not die with callers waiting
            log.exception("the decode thread failed; failing its requests")
            self.error = f"the decode engine failed: {type(e).__name__}: {e}"
            error = EngineFailed(self.error)
        with self._lock:  # nothing more will run: every caller still waiting gets the error
            waiting = [future for _, future in self._waiting]
            self._waiting.clear()
        for future in waiting + [future for _, future in pending.values()]:
            _settle(future, error=error)

    def _loop(self, pending: dict[int, tuple[Row, Future]]) -> None:
        batch = DecodeBatch(self.model, self.max_batch)
        while True:
            newcomers = self._take(batch.free, idle=not batch.live) if batch.free else []
            if self._closed:
                return
            newcomers = [(row, future) for row, future in newcomers if not future.cancelled()]
            if newcomers:
                try:
                    batch.admit([row for row, _ in newcomers])
                    pending.update((id(row), (row, future)) for row, future in newcomers)
                except Exception as e:  # noqa: BLE001 - reported to the callers whose rows failed
                    log.exception("admitting %d rows failed", len(newcomers))
                    for _, future in newcomers:
                        _settle(future, error=e)
                    if not batch.live:
                        batch = DecodeBatch(self.model, self.max_batch)
            gone = [key for key, (_, future) in pending.items() if future.cancelled()]
            if gone:  # callers that went away: free their slots instead of decoding to the cap
                batch.drop([pending.pop(key)[0] for key in gone])
                self.dropped += len(gone)
            if not batch.live:
                continue
            if batch.live > 1:
                self.shared_steps += 1
            try:
                finished = batch.step()
            except Exception as e:  # noqa: BLE001 - the batch is lost: tell every caller in it
                log.exception("a decode step failed")
                for _, future in pending.values():
                    _settle(future, error=e)
                pending.clear()
                batch = DecodeBatch(self.model, self.max_batch)
                continue
            for row, completion in finished:
                _settle(pending.pop(id(row))[1], result=completion)


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Complete a caller's future unless the caller cancelled it (then there is no one to tell:
    setting it would raise InvalidStateError, which must not reach the decode loop)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
