"""Orbax checkpoints: periodic (async) saves of the whole train state, exact resume, and the
params-only directories that export and import read and write.

A run's checkpoints live in `<run dir>/checkpoints/<step>/` as three Orbax items: `params`
(read alone by export), `state` (every other field of the `TrainState`: step, optimizer state,
and whatever is added later) and `meta`, a JSON item with what is not an array: the data iterator position and the running token counters. Orbax
writes each step into a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous checkpoint as the latest one (the leftover temporary directory is
cleaned up when the next run opens the manager). Arrays are restored straight onto the target
shardings, which may come from a different mesh than the one that saved them.

Not here: the HF format (`alpaca_jax.hf`) and the training loops' use of all this (train/step_loop.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from alpaca_jax.config import CheckpointConfig, Config, load_config
from alpaca_jax.errors import UserError
from alpaca_jax.jsonl import read_jsonl


CHECKPOINT_DIR = "checkpoints"   # inside a run directory
PARAMS_ITEM = "params"           # the item (and, in an import-hf output, the directory) with weights
STATE_ITEM = "state"             # the rest of the TrainState
META_ITEM = "meta"               # JSON: data iterator position, counters


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be found, does not fit the model, or could not be written; the message
    says which, in one line."""

    # After a failed save, Orbax's helper threads of that save wait for signals that never come
    # (for minutes, and the interpreter joins them at exit): a command may leave without them.
    abandon_threads = False


class _OrbaxFailureLogFilter(logging.Filter):
    """Orbax logs a failed background save with a traceback from each of its threads (absl
    ERROR records). `Checkpointer` raises that same failure as one `CheckpointError` line, which
    the CLI prints; the tracebacks would only bury it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        traceback = record.exc_info[2] if record.exc_info else None
        files = [record.pathname]
        while traceback is not None:
            files.append(traceback.tb_frame.f_code.co_filename)
            traceback = traceback.tb_next
        return not any(f"{os.sep}orbax{os.sep}" in f for f in files)


class _ClosedLoopCallbackFilter(logging.Filter):
    """When a save fails, Orbax closes its event loop while worker threads of that save are still
    finishing; each then logs 'exception calling callback' with 'Event loop is closed'."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed")


logging.getLogger("absl").addFilter(_OrbaxFailureLogFilter())
logging.getLogger("concurrent.futures").addFilter(_ClosedLoopCallbackFilter())


class Checkpointer:
    """The run's `ocp.CheckpointManager`: which steps to save, how many to keep, restore."""

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig = CheckpointConfig(), *,
                 read_only: bool = False):
        self.cfg = cfg
        self.directory = Path(run_dir).absolute() / CHECKPOINT_DIR
        policy: Any = preservation_policy.LatestN(n=cfg.keep)
        if cfg.keep_best:
            policy = preservation_policy.AnyPreservationPolicy([
                policy,
                # BestN keeps the last n after an ascending sort: reverse=True keeps the lowest loss.
                preservation_policy.BestN(get_metric_fn=lambda m: m["loss"], reverse=True, n=1)])
        # read_only only means "never write" here: Orbax's own read_only mode warns on every use.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=not read_only, create=not read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        # The manager sweeps leftover tmp directories on a background thread and, in orbax 0.12,
        # close() does not wait for it: a run that fails fast (bad data row) then exits while
        # that thread still runs, and it prints a traceback at interpreter shutdown. The sweep
        # is one directory listing, so finish it here.
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        self._in_flight: int | None = None  # the step of a save not yet known to have committed
        self._failed = False

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.cfg.every is not None and step % self.cfg.every == 0)

    def save(self, step: int, state, meta: dict[str, Any], loss: float | None = None) -> None:
        """Start saving (returns once arrays are copied off the devices if async)."""
        rest = _fields(state)
        items = {PARAMS_ITEM: ocp.args.StandardSave(rest.pop("params")),
                 STATE_ITEM: ocp.args.StandardSave(rest),
                 META_ITEM: ocp.args.JsonSave({"step": step, **meta})}
        metrics = {"loss": loss} if loss is not None and np.isfinite(loss) else None
        try:  # async: this also waits for the previous save, and raises its failure
            self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        except Exception as e:
            raise self._failure(self._in_flight or step, e) from None
        self._in_flight = step

    def raise_if_failed(self) -> None:
        """Between steps: once a background save has ended, raise its failure if it failed, so
        that a run whose disk became unwritable stops at once instead of training on unsaved."""
        if self._in_flight is not None and not self._manager.is_saving_in_progress():
            self.wait()

    def _failure(self, step: int | None, error: Exception) -> CheckpointError:
        self._failed = True
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        failure = CheckpointError(f"saving checkpoint {step} in {self.directory} failed: {reason}; "
                                  f"stopping (a rerun resumes from the last complete checkpoint)")
        failure.abandon_threads = True
        return failure

    def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
        """The state at `step`, placed as `abstract_state` (ShapeDtypeStructs with shardings) says."""
        rest = _fields(abstract_state)
        items = {PARAMS_ITEM: ocp.args.StandardRestore(rest.pop("params")),
                 STATE_ITEM: ocp.args.StandardRestore(rest),
                 META_ITEM: ocp.args.JsonRestore()}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"cannot restore {self.directory / str(step)} into this model "
                                  f"(did the model or optimizer config change?): "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        state = type(abstract_state)(params=restored[PARAMS_ITEM], **restored[STATE_ITEM])
        return state, restored[META_ITEM]

    def wait(self) -> None:
        """Block until an in-flight save has committed; raise CheckpointError if it failed."""
        step, self._in_flight = self._in_flight, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._failure(step, e) from None

    def close(self) -> None:
        """Wait for an in-flight save to commit, then release the manager's threads. After a
        failed save nothing is touched: Orbax would raise the failure again and its half-stopped
        threads print tracebacks (see CheckpointError.abandon_threads)."""
        if self._failed:
            return
        self.wait()
        self._manager.close()


def _fields(state) -> dict[str, Any]:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the given shardings (the restore target)."""
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metric lines logged after `step` (a resumed run logs them again), atomically."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    # A line cut short by the kill is dropped; a bad line before the last is an error.
    kept = [json.dumps(record) + "\n" for _, record in read_jsonl(path, error=CheckpointError)
            if record["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


# -- params only: export's input and import's output ----------------------------------------------

@dataclasses.dataclass(frozen=True)
class SavedParams:
    """Where the weights and the config of a run, checkpoint or import-hf output live."""
    config: Config
    params_dir: Path
    run_dir: Path
    step: int | None


def find_params(source: str | Path) -> SavedParams:
    """Resolve a run dir (its latest checkpoint), a checkpoint step dir, or an import-hf output."""
    source = Path(source).absolute()
    if (source / CHECKPOINT_DIR).is_dir():
        run_dir = source
        step = Checkpointer(run_dir, read_only=True).latest_step()
        if step is None:
            raise CheckpointError(f"{source / CHECKPOINT_DIR} holds no complete checkpoint")
        params_dir = source / CHECKPOINT_DIR / str(step) / PARAMS_ITEM
    elif (source / PARAMS_ITEM).is_dir():
        params_dir = source / PARAMS_ITEM
        if (source / "config.yaml").is_file():      # an import-hf output
            run_dir, step = source, None
        else:                                       # <run dir>/checkpoints/<step>
            run_dir, step = source.parent.parent, int(source.name) if source.name.isdigit() else None
    else:
        raise CheckpointError(f"{source}: not a run directory (no {CHECKPOINT_DIR}/), a checkpoint "
                              f"(no {PARAMS_ITEM}/) or an import-hf output")
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir}: no config.yaml beside the checkpoint, so the model "
                              f"shape is unknown")
    return SavedParams(load_config(run_dir / "config.yaml"), params_dir, run_dir, step)


def save_params(directory: str | Path, params) -> Path:
    """Write a params pytree (jax or numpy arrays) as an Orbax checkpoint in `directory/params`."""
    path = Path(directory).absolute() / PARAMS_ITEM
    try:  # made here: Orbax's own failure to create it leaves its threads hanging for minutes
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {path.parent}: {e.strerror}") from None
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, params)
        checkpointer.wait_until_finished()
    return path


def restore_params(params_dir: str | Path, abstract_params=None):
    """Params from an Orbax item directory: onto `abstract_params`' shardings (and dtypes) if
    given, else as host numpy arrays in their saved dtypes (what export streams from)."""
    params_dir = Path(params_dir).absolute()
    with ocp.PyTreeCheckpointer() as checkpointer:
        if abstract_params is None:
            saved = _saved_tree(params_dir)
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
            return checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        _check_shapes(_saved_tree(params_dir), abstract_params, params_dir)
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
            abstract_params)
        try:
            return checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(
                item=abstract_params, restore_args=restore_args))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"cannot restore {params_dir} into this model: "
                                  f"{str(e).splitlines()[0]}") from e


def _saved_tree(params_dir: Path):
    """The saved arrays' metadata tree. Read through the item handler: the checkpointer's own
    `metadata()` also looks for a step-level metadata file, which an item inside a composite
    checkpoint (`checkpoints/<step>/params`) does not have, and warns on every export."""
    from etils import epath
    return ocp.PyTreeCheckpointHandler().metadata(epath.Path(params_dir)).tree


def _check_shapes(saved, expected, where: Path) -> None:
    """Name the first parameter whose saved shape differs (Orbax would say less, or pad)."""
    saved_leaves = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(saved)}
    for key, leaf in jax.tree_util.tree_leaves_with_path(expected):
        name = jax.tree_util.keystr(key)
        if name not in saved_leaves:
            raise CheckpointError(f"{where}: parameter {name} is missing")
        if tuple(saved_leaves[name].shape) != tuple(leaf.shape):
            raise CheckpointError(f"{where}: parameter {name} has shape {list(saved_leaves[name].shape)}, "
                                  f"the model needs {list(leaf.shape)}")
