"""SIGTERM (a cluster's preemption notice) and SIGINT (Ctrl-C) as a request to stop between steps.

The loop checks the request after each step, saves a checkpoint of that step and raises
`Interrupted`, whose message says where the checkpoint is and how to resume. Only the first
signal is caught: the previous handlers are put back at once, so a second Ctrl-C interrupts
even a save that hangs. Signals can only be caught on the main thread; elsewhere (a notebook's
worker thread) training runs as before.
"""

from __future__ import annotations

import signal
import threading

from alpaca_jax.errors import UserError

__all__ = ["StopRequest", "Interrupted"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(UserError, RuntimeError):
    """Training stopped on a signal after saving; `exit_code` is the shell's 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """`received` is the first SIGTERM/SIGINT's number after `install()`, else None."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @classmethod
    def install(cls) -> "StopRequest":
        request = cls()
        if threading.current_thread() is threading.main_thread():
            request._previous = {sig: signal.signal(sig, request._handle) for sig in SIGNALS}
        return request

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        self.restore()

    def restore(self) -> None:
        """Put the handlers found at `install()` back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""
