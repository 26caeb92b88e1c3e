"""`UserError` (every one-line error derives from it; the CLI catches that and nothing by name)
and the one JSONL-tail policy (alpaca_jax/jsonl.py) as the journal, respond's output and a
run's metrics.jsonl apply it: a torn last line is dropped and logged, a bad line anywhere else
is an error naming file:line."""

from __future__ import annotations

import importlib
import json
import logging

import pytest

from alpaca_jax import cli
from alpaca_jax.errors import UserError
from alpaca_jax.jsonl import JsonlError, read_jsonl
from alpaca_jax.llm.journal import Journal

ONE_LINE_ERRORS = [
    ("alpaca_jax.configlib", "ConfigError"), ("alpaca_jax.data.records", "DataError"),
    ("alpaca_jax.train.step_loop", "TrainingError"), ("alpaca_jax.train.preemption", "Interrupted"),
    ("alpaca_jax.checkpoint", "CheckpointError"), ("alpaca_jax.hf.errors", "ConversionError"),
    ("alpaca_jax.data.prompt", "PromptError"), ("alpaca_jax.data.prompt", "PromptTooLongError"),
    ("alpaca_jax.eval.runner", "EvalError"), ("alpaca_jax.eval.judge", "JudgeError"),
    ("alpaca_jax.serve", "RequestError"), ("alpaca_jax.llm.client", "TeacherFatalError"),
    ("alpaca_jax.jsonl", "JsonlError"),
]


@pytest.mark.parametrize("module,name", ONE_LINE_ERRORS)
def test_every_one_line_error_is_a_user_error(module, name):
    assert issubclass(getattr(importlib.import_module(module), name), UserError)


def test_the_cli_catches_any_user_error_by_its_base(monkeypatch, capsys):
    class BrandNewError(UserError):  # a class no table of names could know
        pass

    def dispatch(args):
        raise BrandNewError("data.json:3: the brand-new thing is wrong")
    monkeypatch.setattr(cli, "_dispatch", dispatch)
    assert cli.main(["config"]) == 2
    err = capsys.readouterr().err
    assert err == "error: data.json:3: the brand-new thing is wrong\n"


def test_the_cli_lets_a_programming_error_raise(monkeypatch):
    monkeypatch.setattr(cli, "_dispatch", lambda args: {}["missing"])
    with pytest.raises(KeyError):
        cli.main(["config"])


def _write(path, *lines: bytes) -> None:
    path.write_bytes(b"".join(lines))


def test_a_torn_last_line_is_dropped_logged_and_cut_off(tmp_path, caplog):
    path = tmp_path / "f.jsonl"
    _write(path, b'{"a": 1}\n', b"\n", b'{"a": 2}\n', b'{"a": 3, "b": "cut sh')
    with caplog.at_level(logging.WARNING, logger="alpaca_jax"):
        records = read_jsonl(path, repair=True)
    assert records == [(1, {"a": 1}), (3, {"a": 2})]
    assert f"{path}:4" in caplog.text and "torn" in caplog.text
    assert path.read_bytes() == b'{"a": 1}\n\n{"a": 2}\n'


def test_a_last_line_without_its_newline_is_torn_even_if_it_parses(tmp_path):
    path = tmp_path / "f.jsonl"
    _write(path, b'{"a": 1}\n', b'{"a": 2}')
    assert read_jsonl(path) == [(1, {"a": 1})]
    assert path.read_bytes().endswith(b'{"a": 2}')  # without repair the file is left alone


@pytest.mark.parametrize("bad", [b"{not json}\n", b'{"a": 2\n', b"\xff\xfe\n"])
def test_a_bad_line_before_the_last_names_file_and_line(tmp_path, bad):
    path = tmp_path / "f.jsonl"
    _write(path, b'{"a": 1}\n', bad, b'{"a": 3}\n')
    before = path.read_bytes()
    with pytest.raises(JsonlError, match=rf"^{path}:2: "):
        read_jsonl(path, repair=True)
    assert path.read_bytes() == before  # nothing truncated


def test_the_journal_keeps_paid_records_after_a_bad_middle_line(tmp_path):
    """Before: the journal truncated at the first bad line, silently dropping the paid-for
    records after it. Now that is an error naming the line, and the file is untouched."""
    path = tmp_path / "journal.jsonl"
    good = [json.dumps({"id": f"r{i}", "text": f"t{i}"}) + "\n" for i in range(3)]
    path.write_text(good[0] + "garbage line\n" + good[1] + good[2])
    before = path.read_bytes()
    with pytest.raises(UserError, match=rf"{path}:2"):
        Journal(path)
    assert path.read_bytes() == before


def test_the_journal_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text(json.dumps({"id": "r0", "text": "t0"}) + "\n" + '{"id": "r1", "te')
    journal = Journal(path)
    assert "r0" in journal and "r1" not in journal and len(journal) == 1
    journal.append({"id": "r1", "text": "t1"})
    journal.close()
    assert [r["id"] for _, r in read_jsonl(path)] == ["r0", "r1"]


def test_resuming_a_run_refuses_a_damaged_metrics_file(tmp_path):
    """Before: truncate_metrics stopped at the first bad line and dropped the rest silently."""
    from alpaca_jax.checkpoint import CheckpointError, truncate_metrics
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(CheckpointError, match=rf"{path}:2"):
        truncate_metrics(tmp_path, 3)


def test_resuming_a_run_drops_a_torn_metrics_line_and_later_steps(tmp_path):
    from alpaca_jax.checkpoint import truncate_metrics
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    truncate_metrics(tmp_path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
