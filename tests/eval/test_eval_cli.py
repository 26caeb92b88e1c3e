"""`alpaca-jax eval` through the real CLI: SIGKILL mid-judging and rerun pays no judge request
twice; bad input ends with one line naming it; a file without references is scored without
perplexity/ROUGE-L, saying why."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from judge_fakes import always_a, prefers_good, write_judge_config

from alpaca_jax.cli import main
from alpaca_jax.eval import evaluate

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def _env():
    env = dict(os.environ, OPENAI_API_KEY="dummy")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _eval_command(eval_files, out, judge_config, *runs):
    return [sys.executable, "-m", "alpaca_jax.cli", "eval", *(str(eval_files[r]) for r in runs),
            "--data", str(eval_files["data"]), "-o", str(out), "--judge", str(judge_config)]


def _journal_ids(out) -> set[str]:
    path = out / "judge_journal.jsonl"
    if not path.exists():
        return set()
    return {json.loads(line)["id"] for line in path.read_bytes().splitlines(keepends=True) if line.endswith(b"\n")}


def test_sigkill_then_rerun_pays_no_judge_request_twice(tmp_path, eval_files, judge_server):
    server, _ = judge_server(prefers_good, latency_s=0.05)
    config = write_judge_config(tmp_path / "judge.yaml", server.url, max_concurrency=2)
    out = tmp_path / "out"
    command = _eval_command(eval_files, out, config, "good", "plain")
    process = subprocess.Popen(command, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(server.completed_ids()) < 12 and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    journaled = _journal_ids(out)
    sent_before = len(server.log)
    assert 8 <= len(journaled) < 48, "the kill must land mid-judging"

    done = subprocess.run(command, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    resent = {entry["rid"] for entry in server.log[sent_before:]}
    assert not resent & journaled  # nothing in the journal is asked again
    completed = server.completed_ids()
    assert len(set(completed)) == 48 and _journal_ids(out) == set(completed)
    # Only a reply in flight at the kill (answered, not yet journaled) can be asked twice.
    assert len(completed) - 48 <= 2
    results = json.loads((out / "results.json").read_text())
    assert results["judge"]["answered_from_journal"] == len(journaled)
    good = next(r for r in results["runs"] if r["name"] == "good")["judge"]
    assert good["win_rate"] == 1.0 and good["position_consistency"] == 1.0


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


BAD_INPUT = [  # (case, extra files, command tail, words the one-line message must contain)
    ("missing run dir", lambda t, f: [str(t / "no_such_run"), "--data", str(f["data"])],
     ["run not found", "no_such_run"]),
    ("missing eval file", lambda t, f: [str(f["good"]), "--data", str(t / "nope.jsonl")],
     ["eval data file not found", "nope.jsonl"]),
    ("unreachable judge", lambda t, f: [str(f["good"]), "--data", str(f["data"]), "--judge",
                                        str(write_judge_config(t / "j.yaml", URL, max_connect_retries=2))],
     ["judge at", "cannot be reached", "127.0.0.1"]),
    ("missing judge config", lambda t, f: [str(f["good"]), "--data", str(f["data"]), "--judge", str(t / "j2.yaml")],
     ["config file not found", "j2.yaml"]),
    ("references baseline without references", lambda t, f: [
        str(f["good"]), "--data", str(_no_refs(t, f)), "--baseline", "references", "--judge",
        str(write_judge_config(t / "j3.yaml", URL))], ["--baseline references", "no reference outputs"]),
]
URL = _closed_port_url()


def _no_refs(tmp_path, eval_files):
    rows = [{"instruction": r["instruction"], "input": r["instances"][0]["input"]} for r in eval_files["rows"]]
    path = tmp_path / "no_refs.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("case, tail, words", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_ends_with_one_line_naming_it(tmp_path, eval_files, capsys, case, tail, words):
    # In process (the CLI's own main and error handling): a subprocess per row costs ~10 s of imports.
    code = main(["eval", *tail(tmp_path, eval_files), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in err


def test_a_file_without_references_skips_perplexity_and_rouge_saying_why(tmp_path, eval_files, judge_server):
    server, _ = judge_server(always_a)
    data = _no_refs(tmp_path, eval_files)
    cfg_path = write_judge_config(tmp_path / "judge.yaml", server.url)
    from alpaca_jax.eval import load_judge_config
    results = evaluate([str(eval_files["good"]), str(eval_files["plain"])], str(data), tmp_path / "out",
                       judge=load_judge_config(cfg_path), progress=False)
    assert results["skipped"]["perplexity"] == results["skipped"]["rouge_l"] == f"{data} has no reference outputs"
    assert all(r["rouge_l"] is None and r["perplexity"] is None for r in results["runs"])
    assert results["baseline"] == "good" and results["runs"][1]["judge"]["win_rate"] == 0.5
    assert f"rouge_l skipped: {data} has no reference outputs" in (tmp_path / "out" / "results.md").read_text()
