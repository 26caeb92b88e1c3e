"""Config loading: every shipped YAML, overrides, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alpaca_jax.config import CONFIG_DIR, DEFAULT_CONFIG, ConfigError, load_config
from conftest import REPO

SHIPPED = sorted(p for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_training_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.vocab_size > 0


def test_embedded_default_is_the_shipped_tiny_config():
    """`alpaca-jax train` with no file runs configs/tiny.yaml, which ships inside the package."""
    assert DEFAULT_CONFIG.resolve() == (REPO / "configs" / "tiny.yaml").resolve()
    assert DEFAULT_CONFIG.resolve().is_relative_to((REPO / "alpaca_jax").resolve())
    cfg = load_config(None)
    assert cfg.model.preset == "tiny" and cfg.data.train_files == ("builtin:seed_tasks",)
    assert cfg.model.hidden_size == 128 and cfg.model.vocab_size == 2048  # from the tiny preset


def test_alpaca_7b_holds_the_stanford_recipe():
    cfg = load_config(REPO / "configs" / "alpaca_7b.yaml")
    assert (cfg.optimizer.learning_rate, cfg.train.num_epochs, cfg.optimizer.warmup_ratio,
            cfg.optimizer.weight_decay, cfg.data.max_len, cfg.train.batch_size) == (2e-5, 3, 0.03, 0.0, 512, 128)
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.vocab_size) == (4096, 32, 32000)


def test_overrides_win_over_yaml_and_presets():
    cfg = load_config(REPO / "configs" / "alpaca_7b.yaml",
                      ["train.max_steps=7", "model.num_layers=2", "optimizer.learning_rate=1e-3",
                       "data.train_files=[a.json, b.jsonl]", "model.rope_scaling.factor=4"])
    assert cfg.train.max_steps == 7 and cfg.model.num_layers == 2 and cfg.model.hidden_size == 4096
    assert cfg.optimizer.learning_rate == 1e-3 and cfg.data.train_files == ("a.json", "b.jsonl")
    assert cfg.model.rope_scaling.factor == 4.0 and cfg.model.rope_scaling.high_freq_factor == 4.0


@pytest.mark.parametrize("overrides,message", [
    (["train.max_stepz=3"], "unknown config key 'train.max_stepz'"),
    (["trian.seed=3"], "unknown config key 'trian'"),
    (["train.seed=abc"], "config key 'train.seed': expected int, got 'abc'"),
    (["model.dtype=float64"], "config key 'model.dtype': expected one of"),
    (["model.preset=llama-99b"], "unknown preset 'llama-99b'"),
    (["train.batch_size=6", "train.grad_accum=4"], "train.batch_size (6) must be a positive multiple"),
    (["model.num_heads=6", "model.num_kv_heads=4"], "model.num_heads (6) must be a multiple"),
])
def test_bad_config_is_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "alpaca_jax.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    bad_row = tmp_path / "bad.jsonl"
    bad_row.write_text('{"instruction": "a", "output": "b"}\n{"instruction": 3, "output": "b"}\n')
    cases = [
        (["train", "train.nope=1"], "unknown config key 'train.nope'"),
        (["train", "train.seed=x"], "expected int"),
        (["train", str(tmp_path / "missing.yaml")], "config file not found"),
        (["train", f"data.train_files=[{tmp_path / 'nope.json'}]", f"run.dir={tmp_path / 'r1'}"],
         "data file not found"),
        (["train", f"data.train_files=[{bad_row}]", f"run.dir={tmp_path / 'r2'}"],
         f"{bad_row}:2: field 'instruction' must be a string"),
    ]
    for args, message in cases:
        result = _cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_help_explains_itself():
    result = _cli("--help")
    assert result.returncode == 0 and "train" in result.stdout and "generate" in result.stdout
    result = _cli("train", "--help")
    assert result.returncode == 0 and "section.field=value" in result.stdout
