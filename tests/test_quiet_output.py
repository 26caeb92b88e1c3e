"""Successful commands print what the user needs and nothing that looks like a problem: no
transformers advice about a missing PyTorch, no Orbax warning when an export reads a checkpoint."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.checkpoint import Checkpointer, restore_params
from alpaca_jax.config import CheckpointConfig
from conftest import REPO


def test_no_pytorch_advice_without_pytorch():
    # sys.modules["torch"] = None makes `import torch` fail, as on a machine without PyTorch.
    code = ("import sys; sys.modules['torch'] = None\n"
            "import transformers; assert not transformers.is_torch_available()\n"
            "import alpaca_jax.data.tokenizer\n")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    env["PYTHONPATH"] = str(REPO)
    bare = subprocess.run([sys.executable, "-c", code.replace("import alpaca_jax.data.tokenizer\n", "")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert "PyTorch was not found" in bare.stderr  # the advice exists, so the check below can fail
    ours = subprocess.run([sys.executable, "-c", "import alpaca_jax\n" + code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert "PyTorch was not found" not in ours.stderr, ours.stderr


@flax.struct.dataclass
class _State:
    step: jax.Array
    params: dict


def test_reading_a_run_checkpoints_params_warns_nothing(tmp_path, caplog):
    manager = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    manager.save(1, _State(step=jnp.int32(1), params={"w": jnp.arange(6.0).reshape(2, 3)}), {})
    manager.close()
    with caplog.at_level(logging.WARNING):
        params = restore_params(tmp_path / "checkpoints" / "1" / "params")  # what export-hf reads
    np.testing.assert_array_equal(params["w"], np.arange(6.0).reshape(2, 3))
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
