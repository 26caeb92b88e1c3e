"""Frozen-dataclass configs from YAML with `section.field=value` overrides.

This module is generic: it knows nothing about models or training, so `data_gen/` can use it
too without importing any model code. A config is a tree of frozen dataclasses; YAML supplies a
nested mapping that overrides the dataclass defaults, and command-line overrides patch that
mapping before it is checked. Every error is a `ConfigError` whose message is one line naming
the offending key, so the CLI can print it and exit non-zero.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from alpaca_jax.errors import UserError
from alpaca_jax.files import read_utf8

__all__ = ["ConfigError", "build", "load_yaml", "parse_overrides", "apply_overrides",
           "merge", "to_dict", "dump_yaml", "field_comments", "commented_yaml",
           "parse_bytes"]


class ConfigError(UserError, ValueError):
    """A bad config: the message is a single line that names the key or file."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping document is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(read_utf8(path, ConfigError))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"invalid YAML in {path}{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["a.b=1", "c.d=x"] into a nested mapping; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like section.field=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # an unparseable scalar is taken as a plain string; the type check decides
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}' conflicts with an earlier override")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: `update` wins; mappings merge key by key."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    return merge(data, parse_overrides(overrides))


def build(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a mapping, checking keys and types recursively."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{_join(prefix, key)}' (known: {known})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _check(hints[name], value, _join(prefix, name))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def to_dict(cfg: Any) -> Any:
    """Dataclass tree -> plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """{field name: its one-line comment}, read from the dataclass's source: the `# ...` at the
    end of the field's line, or a comment line right above it. The comment is written once,
    beside the field, and `commented_yaml` prints that very text."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped (a bytecode-only install): no comments
        return {}
    trailing, alone = {}, {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            (alone if token.line.strip().startswith("#") else trailing)[token.start[0]] = text
    comments = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = trailing.get(node.lineno) or trailing.get(node.end_lineno) or alone.get(node.lineno - 1)
            if text:
                comments[node.target.id] = text
    return comments


def commented_yaml(cfg: Any) -> str:
    """A dataclass config as YAML, each key followed by its comment from the source; loading
    the text back gives the same config."""
    return "\n".join(_commented_lines(cfg, 0)) + "\n"


def _commented_lines(cfg: Any, indent: int) -> list[str]:
    comments = field_comments(type(cfg))
    rows = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        comment = comments.get(f.name) or _doc_line(value)
        pad = " " * indent
        if dataclasses.is_dataclass(value):
            rows.append((f"{pad}{f.name}:", comment))
            rows.extend((line, None) for line in _commented_lines(value, indent + 2))
        elif isinstance(value, dict) and value:  # a free-form mapping (mesh.rules): one entry a line
            rows.append((f"{pad}{f.name}:", comment))
            rows.extend((f"{pad}  {_flow(k)}: {_flow(to_dict(v))}", None) for k, v in value.items())
        else:
            rows.append((f"{pad}{f.name}: {_flow(to_dict(value))}", comment))
    width = max(len(text) for text, comment in rows if comment is not None) if rows else 0
    return [text if comment is None else f"{text.ljust(width)}  # {comment}" for text, comment in rows]


def _doc_line(value: Any) -> str | None:
    """A section's comment: the first line of its dataclass docstring."""
    doc = type(value).__doc__ if dataclasses.is_dataclass(value) else None
    return doc.strip().splitlines()[0] if doc and not doc.startswith(type(value).__name__ + "(") else None


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), sort_keys=False)
    return text.removesuffix("...\n").strip()


_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'80GB' -> 80e9, '80GiB' -> 80*2**30."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match or match.group(2) not in _UNITS:
        raise ConfigError(f"cannot read a memory size from '{text}' (e.g. 80GB, 40GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check(tp: Any, value: Any, key: str) -> Any:
    """Check (and lightly coerce) `value` against annotation `tp`; raise naming `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if dataclasses.is_dataclass(args[0]) and set(args[1:]) == {type(None)}:
            return build(args[0], value, key)  # an optional section: its own error names the key inside
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(arg, value, key)
            except ConfigError as e:
                errors.append(e)
        names = " or ".join(_name(a) for a in args)
        raise ConfigError(f"config key '{key}': expected {names}, got {_describe(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': expected one of {list(choices)}, got {_describe(value)}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {_describe(value)}")
        elem = args[0] if args else Any
        return tuple(_check(elem, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {_describe(value)}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_check(kt, k, key): _check(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "2e-5" as a string; accept numeric strings
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config annotation {tp!r} at {key}")
    raise ConfigError(f"config key '{key}': expected {_name(tp)}, got {_describe(value)}")


def _name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))
