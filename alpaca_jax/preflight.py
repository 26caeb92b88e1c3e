"""Cheap checks before a command's expensive work: writable outputs, and resuming a run whose
config changed under it.

`alpaca-jax` calls the output checks before it imports JAX, so a read-only `run.dir` fails in
a second instead of after data loading and compiling; the library functions (`train`,
`export_hf`, `import_hf`) call them again for callers that skip the CLI. Nothing here imports
JAX or model code. Every failure is a `ConfigError` whose message is one line naming the path
or the keys.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from alpaca_jax.configlib import ConfigError, load_yaml, to_dict
from alpaca_jax.files import check_writable_dir, check_writable_file

__all__ = ["check_train_outputs", "check_export_hf", "check_export_gguf", "check_import_hf", "check_model_sources",
           "check_output_dir", "check_output_file", "changed_math_keys", "check_resume_config"]

CHECKPOINT_DIR = "checkpoints"  # as in checkpoint.py, which imports JAX and so cannot be used here
# export-gguf's --type and --lora values (gguf_export/tensors.py maps each type to its encoding).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
GGUF_LORA_MODES = ("merge", "base", "adapter")

# Keys that change no number the run computes: where it writes, how it logs, how it is laid
# out on devices (restoring onto another mesh is exact), and resuming itself.
_NON_MATH_SECTIONS = ("run", "mesh", "distributed", "checkpoint")
_NON_MATH_KEYS = ("train.log_every", "train.progress_bar", "train.resume", "train.allow_config_change",
                  "model.scan_layers", "model.remat", "model.attention", "model.init_from")


def check_train_outputs(cfg) -> None:
    """The run directory and its checkpoints/ must be writable (or creatable)."""
    what = "run.dir" if cfg.run.dir else f"run.dir (default runs/{cfg.run.name}, in the working directory)"
    check_writable_dir(cfg.run.path, what, ConfigError)
    checkpoints = cfg.run.path / CHECKPOINT_DIR
    if checkpoints.exists() or checkpoints.is_symlink():
        check_writable_dir(checkpoints, "checkpoint directory", ConfigError)


def check_export_hf(source: str | Path, out_dir: str | Path) -> None:
    """export-hf reads a run, checkpoint or import-hf output directory and writes OUT_DIR."""
    if not Path(source).is_dir():
        raise ConfigError(f"RUN_DIR_OR_CHECKPOINT: {source} is not a directory")
    check_writable_dir(out_dir, "OUT_DIR", ConfigError)


def check_export_gguf(source: str | Path, out: str | Path, type: str, lora: str) -> None:
    """export-gguf reads a run, checkpoint, import-hf output or HF directory and writes one file."""
    if type not in GGUF_TYPES:
        raise ConfigError(f"--type {type!r} is not one of {', '.join(GGUF_TYPES)}")
    if lora not in GGUF_LORA_MODES:
        raise ConfigError(f"--lora {lora!r} is not one of {', '.join(GGUF_LORA_MODES)}")
    if not Path(source).is_dir():
        raise ConfigError(f"RUN: {source} is not a directory (a run, RUN/checkpoints/STEP, an import-hf "
                          f"output or a local Hugging Face LLaMA directory)")
    check_writable_file(out, "OUT", ConfigError)


def check_import_hf(hf_dir: str | Path, out_dir: str | Path) -> None:
    """import-hf reads HF_DIR/config.json and writes a new OUT/params."""
    if not (Path(hf_dir) / "config.json").is_file():
        raise ConfigError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    if (Path(out_dir) / "params").exists():
        raise ConfigError(f"{Path(out_dir) / 'params'} already exists; choose a new output directory")
    check_writable_dir(out_dir, "OUT", ConfigError)


def check_model_sources(sources, what: str) -> None:
    """chat/respond/serve/eval read runs, checkpoints, HF directories (or, for eval, files);
    `what` names them as the loaders do ("model directory", "run")."""
    for source in sources:
        if not Path(source).exists():
            raise ConfigError(f"{what} not found: {source} (a run directory, RUN/checkpoints/STEP, "
                              f"an import-hf output or a local Hugging Face directory)")


def check_output_dir(path: str | Path, what: str) -> None:
    check_writable_dir(path, what, ConfigError)


def check_output_file(path: str | Path, what: str) -> None:
    check_writable_file(path, what, ConfigError)


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    """{section: {field: value}} -> {"section.field": value}. Only sections are opened: a field
    that is itself a mapping (model.rope_scaling, mesh.rules) is compared whole."""
    out: dict[str, Any] = {}
    for section, fields in config.items():
        if isinstance(fields, dict):
            out.update({f"{section}.{field}": value for field, value in fields.items()})
        else:
            out[str(section)] = fields
    return out


def changed_math_keys(saved: dict[str, Any], cfg) -> list[str]:
    """Keys whose values differ between a saved config mapping and `cfg`, that change the math."""
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    changed = []
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in _NON_MATH_SECTIONS or key in _NON_MATH_KEYS:
            continue
        if _normal(old.get(key)) != _normal(new.get(key)):
            changed.append(f"{key} ({old.get(key)!r} -> {new.get(key)!r})")
    return changed


def _normal(value: Any) -> Any:
    """YAML reads back tuples as lists and 2 where 2.0 was written; compare as the config does."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def check_resume_config(run_dir: Path, cfg, step: int, keep_old: bool = True) -> None:
    """Resuming `run_dir` at checkpoint `step` with `cfg`: refuse a change to the run's math
    (unless train.allow_config_change), and keep the old config as config.<step>.yaml (when
    `keep_old`: one process of a multi-process run writes it, every process checks)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = load_yaml(saved_path)
    changed = changed_math_keys(saved, cfg)
    if changed and not cfg.train.allow_config_change:
        raise ConfigError(f"{saved_path}: resuming checkpoint {step} with a changed config: "
                          f"{', '.join(changed)}; set train.allow_config_change=true to resume "
                          f"anyway, or choose another run.dir")
    if keep_old and saved != to_dict(cfg):
        shutil.copyfile(saved_path, run_dir / f"config.{step}.yaml")
