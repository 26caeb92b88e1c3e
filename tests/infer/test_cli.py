"""The `respond` and `chat` commands as a user runs them: a process killed with SIGKILL and
rerun, an interactive session interrupted with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets

from alpaca_jax.data import tokenize_dataset
from alpaca_jax.infer import Row, SamplingConfig, decode_rows, load_model
from alpaca_jax.respond import respond

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "alpaca_jax.cli", *args], cwd=REPO, env=env, **kw)


def _training_prompt_ids(model, instruction: str, input: str) -> list[int]:  # noqa: A002
    """Training's own tokenization of the row, cut where the loss starts (the answer)."""
    kept, _ = tokenize_dataset(datasets.Dataset.from_list([{"instruction": instruction, "input": input,
                                                            "output": "x"}]),
                               model.tokenizer, model.max_len, model.add_bos, template=model.template)
    ids, mask = list(kept["input_ids"][0]), list(kept["loss_mask"][0])
    return [int(t) for t in ids[:mask.index(True)]]


def test_respond_killed_and_rerun_answers_every_row_once(tmp_path, tiny_run):
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(120)]
    rows.append({"instruction": "Seed-style task.", "instances": [{"input": "x", "output": "y"}, {"input": "z", "output": "w"}]})
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    process = _cli("respond", str(tiny_run), "--input", str(source), "-o", str(out), "--batch-size", "4",
                   "--max-new-tokens", "8", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out.is_file() and out.stat().st_size) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = out.read_text().splitlines()
    assert 0 < len(before) < 122, "the kill should land mid-run"
    with open(out, "a") as f:
        f.write('{"index": 121, "instruction": "Seed-st')  # a line torn by the kill
    answered_now = respond(tiny_run, source, out, SamplingConfig(max_new_tokens=8), batch_size=4, progress=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["index"] for r in records) == list(range(122))  # each row exactly once
    assert answered_now == 122 - len(before)
    assert records[:len(before)] == [json.loads(line) for line in before]  # finished rows untouched
    by_index = {r["index"]: r for r in records}
    assert by_index[120]["input"] == "x" and by_index[121]["reference"] == "w"
    assert all(r["completion_tokens"] <= 8 and isinstance(r["output"], str) for r in records)
    assert respond(tiny_run, source, out, progress=False) == 0  # nothing left to do
    # The same file as one uninterrupted run (line order aside: rows finish in batch order) ...
    whole = tmp_path / "uninterrupted.jsonl"
    respond(tiny_run, source, whole, SamplingConfig(max_new_tokens=8), batch_size=4, progress=False)
    assert by_index == {r["index"]: r for r in map(json.loads, whole.read_text().splitlines())}
    # ... and each row's answer is that row decoded alone from the prompt training saw.
    model = load_model(tiny_run)
    for index in (0, 7, 60, 119, 120, 121):
        row = rows[index] if index < 120 else {"instruction": rows[120]["instruction"],
                                                "input": rows[120]["instances"][index - 120]["input"]}
        ids = _training_prompt_ids(model, row["instruction"], row["input"])
        solo = decode_rows(model, [Row(ids, SamplingConfig(max_new_tokens=8))])[0]
        assert (by_index[index]["output"], by_index[index]["prompt_tokens"]) == (solo.text, len(ids))


class _Reader:
    """Collects a pipe's bytes on a thread so the test can wait for text with a timeout."""

    def __init__(self, pipe):
        self.data = b""
        self._pipe = pipe
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while chunk := self._pipe.read1(4096):
            self.data += chunk

    def wait_for_length(self, length: int, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while len(self.data.decode("utf-8", "replace")) < length:
            assert time.monotonic() < deadline, f"output stopped at {self.data[-500:]!r}"
            time.sleep(0.01)

    def wait_for(self, text: str, start: int = 0, timeout: float = 240) -> int:
        deadline = time.monotonic() + timeout
        while (at := self.data.decode("utf-8", "replace").find(text, start)) < 0:
            assert time.monotonic() < deadline, f"no {text!r} in {self.data[-500:]!r}"
            time.sleep(0.02)
        return at + len(text)


def test_chat_streams_and_ctrl_c_stops_the_answer_not_the_session(long_context_run):
    process = _cli("chat", str(long_context_run), "--temperature", "0", "--max-new-tokens", "1500",
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = _Reader(process.stdout)
    try:
        at = out.wait_for(">>> ")
        process.stdin.write(b"Add 3 and 4.\n")
        process.stdin.flush()
        out.wait_for_length(at + 20)  # the answer is streaming
        process.send_signal(signal.SIGINT)
        at = out.wait_for("(stopped)", at)
        at = out.wait_for(">>> ", at)  # the session goes on
        process.stdin.write(b"/reset\n")
        process.stdin.flush()
        out.wait_for("(conversation cleared)", at)
        process.stdin.close()
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
    assert b"Traceback" not in process.stderr.read()


BAD_INPUT = [  # (arguments, words the one-line message must contain)
    (["respond", "{missing}", "--input", "{rows}", "-o", "{out}"], "model directory not found"),
    (["respond", "{run}", "--input", "{missing}", "-o", "{out}"], "data file not found"),
    (["respond", "{run}", "--input", "{rows}", "-o", "{out}", "--top-p", "3"], "top_p"),
    (["respond", "{run}", "--input", "{bad_rows}", "-o", "{out}"], "bad.jsonl:2"),
    (["chat", "{missing}"], "model directory not found"),
    (["serve", "{run}", "--api-key-env", "ALPACA_JAX_UNSET_KEY"], "ALPACA_JAX_UNSET_KEY"),
]


def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_run, capsys, monkeypatch):
    from alpaca_jax.cli import main
    monkeypatch.delenv("ALPACA_JAX_UNSET_KEY", raising=False)
    (tmp_path / "rows.jsonl").write_text('{"instruction": "Hi"}\n')
    (tmp_path / "bad.jsonl").write_text('{"instruction": "Hi"}\n{"instruction": 3}\n')
    paths = {"missing": tmp_path / "nope", "rows": tmp_path / "rows.jsonl", "bad_rows": tmp_path / "bad.jsonl",
             "out": tmp_path / "out.jsonl", "run": tiny_run}
    for args, words in BAD_INPUT:
        code = main([a.format(**paths) for a in args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], (args, err)
