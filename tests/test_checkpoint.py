"""Checkpoints: exact resume after SIGKILL through the real CLI, a kill in the middle of a save,
retention (keep the last K, optionally the best), refusing to resume, restoring onto another mesh."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alpaca_jax.checkpoint import Checkpointer, truncate_metrics
from alpaca_jax.config import CheckpointConfig, config_from_dict, load_config
from alpaca_jax.train import TrainingError, read_metrics, train
from conftest import REPO

N = 3  # the run is killed after step N's checkpoint; it has 2N steps in all
# The tiny model of the dataclass defaults (a YAML of its own, so that edits to the shipped
# configs do not change what this test runs).
OVERRIDES = [f"train.max_steps={2 * N}", "train.log_every=1", f"checkpoint.every={N}", "checkpoint.keep=1",
             "train.progress_bar=false", "run.tensorboard=false"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _comparable(records):
    """Every metric but throughput, which is wall-clock and differs between any two runs."""
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]


def _committed(run_dir: Path, step: int) -> bool:
    # Orbax writes <step>.orbax-checkpoint-tmp and renames it to <step> when the save is complete.
    return (run_dir / "checkpoints" / str(step) / "meta").is_dir()


@pytest.fixture(scope="module")
def resumed_and_reference(tmp_path_factory):
    """An uninterrupted 2N-step run, and one SIGKILLed after step N's checkpoint then restarted."""
    root = tmp_path_factory.mktemp("resume")
    reference_dir, killed_dir = root / "reference", root / "killed"
    (root / "tiny.yaml").write_text("train:\n  seed: 0\n")
    command = [sys.executable, "-m", "alpaca_jax.cli", "train", str(root / "tiny.yaml"), *OVERRIDES]
    reference = subprocess.Popen(command + [f"run.dir={reference_dir}"], env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen(command + [f"run.dir={killed_dir}"], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not _committed(killed_dir, N):
        assert killed.poll() is None, "the run ended before its step-N checkpoint was seen"
        assert time.monotonic() < deadline, "no step-N checkpoint within 300 s"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    logged_before_restart = [m["step"] for m in read_metrics(killed_dir)]
    _, reference_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_err[-3000:]
    restart = subprocess.run(command + [f"run.dir={killed_dir}"], env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert restart.returncode == 0, restart.stderr[-3000:]
    return reference_dir, killed_dir, logged_before_restart, restart.stderr


def test_resume_after_sigkill_repeats_every_metric_bitwise(resumed_and_reference):
    reference_dir, killed_dir, logged_before_restart, restart_log = resumed_and_reference
    assert 2 * N not in logged_before_restart, "the kill came too late to test anything"
    assert f"resumed from checkpoint {killed_dir / 'checkpoints' / str(N)} (step {N} of {2 * N})" in restart_log
    reference, resumed = read_metrics(reference_dir), read_metrics(killed_dir)
    assert [m["step"] for m in resumed] == list(range(1, 2 * N + 1))  # no step logged twice
    assert _comparable(resumed) == _comparable(reference)  # floats compared exactly
    summary = json.loads((killed_dir / "summary.json").read_text())
    assert summary["first_loss"] == reference[0]["loss"] and summary["last_loss"] == reference[-1]["loss"]


def test_keep_last_k_checkpoints(resumed_and_reference):
    reference_dir, *_ = resumed_and_reference
    # keep=1: only the final checkpoint is left, and no temporary directory.
    assert sorted(p.name for p in (reference_dir / "checkpoints").iterdir()) == [str(2 * N)]


def test_resume_false_refuses_a_run_dir_with_checkpoints(resumed_and_reference):
    reference_dir, *_ = resumed_and_reference
    before = (reference_dir / "config.yaml").read_text()
    cfg = config_from_dict({}, [f"run.dir={reference_dir}", "train.resume=false"])
    with pytest.raises(TrainingError, match=rf"already has a checkpoint \(step {2 * N}\) and train.resume=false"):
        train(cfg)
    assert (reference_dir / "config.yaml").read_text() == before  # nothing touched


_KILL_MID_SAVE = textwrap.dedent("""
    import os, signal, sys
    import flax.struct, jax, jax.numpy as jnp
    from alpaca_jax.checkpoint import Checkpointer
    from alpaca_jax.config import CheckpointConfig

    @flax.struct.dataclass
    class TinyState:
        step: jax.Array
        params: dict

    manager = Checkpointer(sys.argv[1], CheckpointConfig(keep=3))
    big = jnp.ones((64, 1024, 1024), jnp.float32)  # 256 MiB: its write takes a while
    manager.save(1, TinyState(step=jnp.int32(1), params={"w": big}), {"data": {"epoch": 0, "index": 1}})
    manager.wait()
    manager.save(2, TinyState(step=jnp.int32(2), params={"w": big * 2}), {"data": {"epoch": 0, "index": 2}})
    os.kill(os.getpid(), signal.SIGKILL)  # save() has returned; step 2 is being written
""")


@flax.struct.dataclass
class TinyState:  # a stand-in TrainState: the manager saves whatever fields a state has
    step: jax.Array
    params: dict


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _KILL_MID_SAVE, str(tmp_path)], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert "1" in leftovers and "2" not in leftovers, leftovers  # step 2 never committed
    manager = Checkpointer(tmp_path, CheckpointConfig(keep=3))  # cleans the partial step-2 dir
    assert manager.latest_step() == 1
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = TinyState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding),
                         params={"w": jax.ShapeDtypeStruct((64, 1024, 1024), jnp.float32, sharding=sharding)})
    state, meta = manager.restore(1, abstract)
    assert int(state.step) == 1 and float(state.params["w"][5, 6, 7]) == 1.0
    assert meta == {"step": 1, "data": {"epoch": 0, "index": 1}}
    manager.save(2, state, meta)  # and the run can go on saving
    manager.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


def test_keep_best_keeps_the_lowest_loss_beside_the_last_k(tmp_path):
    manager = Checkpointer(tmp_path, CheckpointConfig(keep=2, keep_best=True, async_save=False))
    for step, loss in [(1, 5.0), (2, 1.0), (3, 4.0), (4, 3.0), (5, 2.0)]:
        manager.save(step, TinyState(step=jnp.int32(step), params={"w": jnp.zeros(2)}), {}, loss=loss)
    manager.close()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 4, 5]


def test_truncate_metrics_drops_later_and_torn_lines(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')
    truncate_metrics(tmp_path, 3)
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:2]) + '\n{"step": 3, "lo')
    truncate_metrics(tmp_path, 3)  # a line torn by the kill is dropped, not half-kept
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]


_OTHER_MESH = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from alpaca_jax import sharding
    from alpaca_jax.checkpoint import Checkpointer
    from alpaca_jax.config import load_config
    from alpaca_jax.model import logical_axes
    from alpaca_jax.train.step_loop import abstract_state
    from alpaca_jax.train.optim import learning_rate_schedule, make_optimizer
    from alpaca_jax.train.state import state_shardings
    run_dir, out = sys.argv[1], sys.argv[2]
    cfg = load_config(f"{run_dir}/config.yaml", ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"])
    mesh = sharding.make_mesh(cfg.mesh)
    optimizer = make_optimizer(cfg.optimizer, learning_rate_schedule(cfg.optimizer, 10), logical_axes(cfg.model))
    shardings = state_shardings(cfg.model, optimizer, mesh, cfg.mesh.rules)
    manager = Checkpointer(run_dir, cfg.checkpoint)
    state, meta = manager.restore(manager.latest_step(), abstract_state(cfg, optimizer, shardings))
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    np.savez(out, **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves})
    wq = state.params["layers"]["attention"]["wq"]
    print(json.dumps({"devices": len(wq.sharding.device_set), "spec": str(wq.sharding.spec),
                      "sharded_leaves": sum(len(leaf.sharding.device_set) == 4 and not leaf.sharding.is_fully_replicated
                                            for _, leaf in leaves)}))
""")


def test_restore_onto_a_different_mesh(resumed_and_reference, tmp_path):
    """Saved on one device, restored sharded over a 2x2 (fsdp x tensor) mesh: every parameter
    and optimizer-state leaf equals the one-device restore exactly."""
    from alpaca_jax import sharding
    from alpaca_jax.model import logical_axes
    from alpaca_jax.train.step_loop import abstract_state
    from alpaca_jax.train.optim import learning_rate_schedule, make_optimizer
    from alpaca_jax.train.state import state_shardings

    reference_dir, *_ = resumed_and_reference
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = tmp_path / "other_mesh.npz"
    proc = subprocess.run([sys.executable, "-c", _OTHER_MESH, str(reference_dir), str(out)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4 and "fsdp" in report["spec"] and "tensor" in report["spec"]
    assert report["sharded_leaves"] > 0

    cfg = load_config(reference_dir / "config.yaml", ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
    assert cfg.model.scan_layers
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    optimizer = make_optimizer(cfg.optimizer, learning_rate_schedule(cfg.optimizer, 10), logical_axes(cfg.model))
    shardings = state_shardings(cfg.model, optimizer, mesh, cfg.mesh.rules)
    manager = Checkpointer(reference_dir, cfg.checkpoint, read_only=True)
    state, _ = manager.restore(manager.latest_step(), abstract_state(cfg, optimizer, shardings))
    expected = {jax.tree_util.keystr(path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
    with np.load(out) as restored:
        assert sorted(restored.files) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(restored[name], value, err_msg=name)
    assert int(expected[".step"]) == 2 * N
    assert any(name.startswith(".opt_state") for name in expected)  # optimizer state compared too
