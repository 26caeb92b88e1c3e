"""kill -9 at random moments, resume, and get exactly the uninterrupted run's output.

The generator runs as `python -m data_gen generate ...` in a subprocess; the fake server runs
in this process, so it survives the kills and logs every call. After each kill we read the
journal (what the generator had durably completed) and check that the server never again
receives any of those requests.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _command(server, out, seed_file):
    return [sys.executable, "-m", "data_gen", "generate", str(REPO / "configs/generate/self_instruct.yaml"),
            f"teacher.base_url={server.url}", "teacher.timeout_s=0.5", "teacher.backoff_initial_s=0.01",
            "teacher.backoff_max_s=0.05", "teacher.max_concurrency=4", "pipeline.num_instructions=50",
            "pipeline.requests_per_round=2", f"pipeline.seed_tasks={seed_file}", f"output.dir={out}",
            "output.progress=false"]


def _env():
    env = dict(os.environ, OPENAI_API_KEY="dummy")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _journal_ids(out: Path) -> set[str]:
    path = out / "journal.jsonl"
    if not path.exists():
        return set()
    ids = set()
    for line in path.read_bytes().splitlines(keepends=True):
        if line.endswith(b"\n"):
            ids.add(json.loads(line)["id"])
    return ids


def test_sigkill_and_resume_equals_uninterrupted_run(tmp_path, fake_server, seed_file):
    reference_server = fake_server(latency_s=0.01, fault_rate=0.1, stall_s=0.6)
    reference = tmp_path / "reference"
    done = subprocess.run(_command(reference_server, reference, seed_file), env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    server = fake_server(latency_s=0.01, fault_rate=0.1, stall_s=0.6)
    out = tmp_path / "crashy"
    rng = random.Random(1234)
    kills = []  # (time of kill, ids durably completed at that moment)
    for _ in range(4):
        process = subprocess.Popen(_command(server, out, seed_file), env=_env(), cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Kill at a random point after a random number of newly completed requests (waiting on
        # the journal rather than the clock keeps this meaningful on a loaded machine).
        target = len(_journal_ids(out)) + rng.randint(1, 25)
        deadline = time.time() + 60
        while process.poll() is None and len(_journal_ids(out)) < target and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.05))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills.append((time.time(), _journal_ids(out)))
    assert len(kills) >= 3 and any(ids for _, ids in kills)
    final = subprocess.run(_command(server, out, seed_file), env=_env(), cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr

    expected = json.loads((reference / "data.json").read_text())
    assert json.loads((out / "data.json").read_text()) == expected and len(expected) > 50
    report, reference_report = (json.loads((d / "report.json").read_text()) for d in (out, reference))
    for key in ("kept", "candidates", "dropped", "tokens", "similarity_histogram", "requests"):
        assert report[key] == reference_report[key], key
    # No completed request was ever sent again after the kill that found it in the journal.
    for killed_at, completed in kills:
        resent = {e["rid"] for e in server.log if e["time"] > killed_at + 0.05} & completed
        assert not resent
    # Every logical request that succeeded was answered once, plus at most the few that were in
    # flight when a kill landed (at most max_concurrency per kill).
    ok = [e["rid"] for e in server.log if e["outcome"] == "ok"]
    assert len(ok) - len(set(ok)) <= 4 * len(kills)
