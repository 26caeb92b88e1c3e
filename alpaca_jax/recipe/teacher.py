"""The closed loop: serve an earlier round's model with our own `serve` while `generate` runs.

`served_teacher(model)` starts `alpaca-jax serve MODEL` on 127.0.0.1 at a free port, waits (with
a deadline) until it answers GET /v1/models, yields its base URL, and stops it afterwards,
whatever happened. The server's log goes to a file in the stage folder.

Not here: the generator's client (alpaca_jax.llm.client), the server (alpaca_jax.serve).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from alpaca_jax.recipe.stages import TEACHER_KEY_ENV, TEACHER_MODEL_NAME, RecipeError

__all__ = ["served_teacher"]

START_DEADLINE_S = 600.0   # loading and compiling a large model takes minutes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_teacher(model: str | Path, log_path: Path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault(TEACHER_KEY_ENV, "local")  # the client wants a key; the server checks none
    with open(log_path, "ab") as log:
        server = subprocess.Popen([sys.executable, "-m", "alpaca_jax.cli", "serve", str(model), "--host",
                                   "127.0.0.1", "--port", str(port), "--model-name", TEACHER_MODEL_NAME],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            if server.poll() is not None:
                raise RecipeError(f"config key 'teacher_from': `alpaca-jax serve {model}` exited with "
                                  f"code {server.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RecipeError(f"config key 'teacher_from': the server for {model} did not answer "
                                      f"within {START_DEADLINE_S:.0f} s; see {log_path}") from None
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
