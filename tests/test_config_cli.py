"""`alpaca-jax config`: the resolved config as YAML with each key's comment, loadable back; every
key has a comment in config.py and a row in README's key table."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing

import yaml

from alpaca_jax.config import Config, config_from_dict, load_config
from alpaca_jax.configlib import field_comments
from conftest import REPO

OVERRIDES = ["train.max_steps=7", "model.rope_scaling={factor: 4.0}", "mesh.fsdp=2"]


def _section_class(section: dataclasses.Field) -> type:
    """The section's dataclass, also for an optional section whose default is None (lora)."""
    if section.default is not None:
        return type(section.default)
    hint = typing.get_type_hints(Config)[section.name]
    return next(arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg))


def _keys():
    """(dotted key, section dataclass, field name) for every field of every section."""
    for section in dataclasses.fields(Config):
        cls = _section_class(section)
        for f in dataclasses.fields(cls):
            yield f"{section.name}.{f.name}", cls, f.name


def test_config_prints_the_resolved_config_with_comments():
    tiny = str(REPO / "configs" / "tiny.yaml")
    out = subprocess.run([sys.executable, "-m", "alpaca_jax.cli", "config", tiny, *OVERRIDES],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert config_from_dict(yaml.safe_load(out.stdout)) == load_config(tiny, OVERRIDES)  # loadable back
    assert re.search(r"^  max_steps: 7 +# total optimizer steps", out.stdout, re.M)
    assert re.search(r"^    factor: 4.0 +# how much longer", out.stdout, re.M)  # nested section
    assert re.search(r"^  rules: +# logical axis -> mesh axis", out.stdout, re.M)  # comment on the line above
    assert re.search(r"^checkpoint: +# Orbax checkpoints", out.stdout, re.M)  # section: its docstring


def test_every_config_key_has_a_comment_and_a_readme_row():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("### Config keys"):]
    table = table[:table.index("\n#", 1)]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    missing_comment, missing_row = [], []
    for key, cls, name in _keys():
        if not field_comments(cls).get(name):
            missing_comment.append(key)
        section, field = key.split(".")[0], key.split(".")[-1]
        if not any(f"{section}." in row and re.search(rf"\b{field}\b", row) for row in rows):
            missing_row.append(key)
    assert not missing_comment, f"keys without a comment in config.py: {missing_comment}"
    assert not missing_row, f"keys without a row in README's 'Config keys' table: {missing_row}"


def test_train_help_points_to_the_config_command():
    out = subprocess.run([sys.executable, "-m", "alpaca_jax.cli", "train", "--help"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and "alpaca-jax config [CONFIG] [overrides]" in " ".join(out.stdout.split())
