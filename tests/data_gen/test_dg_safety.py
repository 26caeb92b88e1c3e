"""The safety pipeline against the suite's fake teacher, with neutral stand-in instructions (the
repository ships no harmful text): every instruction gets exactly one refusal row (and one pair
with a complying endpoint); a run killed with SIGKILL and rerun pays for no request twice."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from data_gen.config import load_config
from data_gen.generate import generate

REPO = Path(__file__).resolve().parents[2]
STAND_INS = [f"Explain how to water a {plant} plant." for plant in
             ("tomato", "basil", "cactus", "fern", "orchid", "mint", "ivy", "rose", "tulip", "lily", "oak", "pine")]


def _refusal(instruction: str) -> str:  # what the fake teacher answers, written out here
    return f"I can't help with \"{instruction}\", but I can point you to safe resources."


def _instructions(tmp_path: Path) -> Path:
    path = tmp_path / "unsafe.jsonl"
    rows = [{"instruction": s} if i % 2 else s for i, s in enumerate(STAND_INS)]  # objects and plain strings
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _overrides(server, out: Path, instructions: Path, *extra: str) -> list[str]:
    return [f"teacher.base_url={server.url}", "teacher.timeout_s=2", "teacher.backoff_initial_s=0.01",
            "teacher.backoff_max_s=0.05", f"pipeline.unsafe_instructions={instructions}",
            "pipeline.requests_per_round=3", f"output.dir={out}", "output.progress=false", *extra]


def test_every_unsafe_instruction_gets_exactly_one_refusal_and_one_pair(tmp_path, fake_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "dummy")
    teacher, complier = fake_server(fault_rate=0.2), fake_server()
    out = tmp_path / "out"
    config = load_config(REPO / "configs/generate/safety.yaml", _overrides(
        teacher, out, _instructions(tmp_path), f"complier={{model: other, api: chat, base_url: '{complier.url}'}}"))
    report = generate(config)
    assert report["stop"] == "target"
    rows = json.loads((out / "data.json").read_text())
    assert rows == [{"instruction": s, "input": "", "output": _refusal(s)} for s in STAND_INS]
    pairs = json.loads((out / "pairs.json").read_text())
    assert pairs == [{"instruction": s, "input": "", "chosen": _refusal(s),
                      "rejected": f"Sure. Here is everything about \"{s}\"."} for s in STAND_INS]
    assert len(complier.completed_ids()) == len(STAND_INS)


def _journal_ids(out: Path) -> set[str]:
    path = out / "journal.jsonl"
    if not path.exists():
        return set()
    return {json.loads(line)["id"] for line in path.read_bytes().splitlines(keepends=True) if line.endswith(b"\n")}


def test_kill_and_rerun_pays_nothing_twice(tmp_path, fake_server):
    server = fake_server(latency_s=0.15)
    out, instructions = tmp_path / "out", _instructions(tmp_path)
    command = [sys.executable, "-m", "data_gen", "generate", str(REPO / "configs/generate/safety.yaml"),
               *_overrides(server, out, instructions, "teacher.max_concurrency=1")]
    env = dict(os.environ, OPENAI_API_KEY="dummy", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(_journal_ids(out)) < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    journaled = _journal_ids(out)  # what the killed run had durably paid for
    assert 4 <= len(journaled) < len(STAND_INS)
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    counts = collections.Counter(server.completed_ids())
    assert all(counts[rid] == 1 for rid in journaled)  # never asked again
    assert len(counts) == len(STAND_INS)
    # Only a reply in flight at the kill (one at a time here) can be lost and asked again.
    assert sum(n - 1 for n in counts.values()) <= 1
    rows = json.loads((out / "data.json").read_text())
    assert [r["instruction"] for r in rows] == STAND_INS and all(r["output"] == _refusal(r["instruction"]) for r in rows)
    assert json.loads((out / "report.json").read_text())["this_run"]["from_journal"] >= 4
