"""Benchmark: a committee of three teachers against one, and Batch API ingest.

1. Requests per second through `Committee.complete` with three fake teachers whose answers take
   50, 100 and 200 ms (the test suite's fake OpenAI server on 127.0.0.1, the real `openai`
   client), each at the same `max_concurrency`, against one teacher at that concurrency with
   each of those latencies alone. The committee's weights are 4:2:1, proportional to what each
   teacher can serve (concurrency / latency), so no teacher waits on another at the end of a
   batch; an equal-weight committee (1:1:1) is measured too. Committee and single runs are
   interleaved, best of `--repeats`.
2. Batch ingest: rows per second of `ingest_lines` (parse a Batch API output file, validate
   each body with the `openai` types, journal every row with one fsync) for a `--rows`-row
   output file of completions of Alpaca-sized answers.

    python benchmarks/committee.py --out benchmarks/results/committee.json
    python benchmarks/committee.py --quick        # seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import load_average, machine  # noqa: E402  (this folder, on sys.path)

from data_gen.batch import ingest_lines  # noqa: E402
from data_gen.committee import Committee  # noqa: E402
from data_gen.config import GenerateConfig, MemberConfig  # noqa: E402
from alpaca_jax.llm.journal import Journal  # noqa: E402
from alpaca_jax.llm.client import Request  # noqa: E402

_spec = importlib.util.spec_from_file_location("_bench_fake", REPO / "tests" / "data_gen" / "fake_openai.py")
fake_openai = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_openai)

LATENCIES = (0.05, 0.1, 0.2)


def _reply(prompt: str):
    return f"An answer to: {prompt}", "stop"


def _member(name: str, url: str, weight: float, concurrency: int) -> MemberConfig:
    return MemberConfig(name=name, model=f"model-{name}", api="completions", base_url=url, weight=weight,
                        max_concurrency=concurrency, max_retries=2, timeout_s=30.0)


def _rate(servers: list, weights: list[float], concurrency: int, n: int, tag: str) -> float:
    """Requests/s of one Committee.complete call over n fresh requests."""
    members = tuple(_member(f"t{i}", s.url, w, concurrency) for i, (s, w) in enumerate(zip(servers, weights)))
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(Path(tmp) / "journal.jsonl")
        committee = Committee(GenerateConfig(teachers=members), journal)
        requests = [Request.build(f"bench/{tag}/{i}", f"Question {tag} {i}?", {"max_tokens": 16}, []) for i in range(n)]
        start = time.perf_counter()
        answers = committee.complete(requests)
        seconds = time.perf_counter() - start
        journal.close()
    assert sum(a is not None for a in answers.values()) == n, "a request failed"
    return n / seconds


def bench_committee(concurrency: int, n: int, repeats: int) -> dict:
    servers = [fake_openai.FakeOpenAI(latency_s=latency, reply=_reply).start() for latency in LATENCIES]
    serving = [concurrency / latency for latency in LATENCIES]
    runs = {"committee_4_2_1": [], "committee_1_1_1": [], **{f"single_{int(l * 1000)}ms": [] for l in LATENCIES}}
    try:
        for r in range(repeats):
            runs["committee_4_2_1"].append(_rate(servers, serving, concurrency, n, f"w{r}"))
            for latency, server in zip(LATENCIES, servers):
                runs[f"single_{int(latency * 1000)}ms"].append(_rate([server], [1.0], concurrency, n // 3, f"s{latency}{r}"))
            runs["committee_1_1_1"].append(_rate(servers, [1.0, 1.0, 1.0], concurrency, n, f"e{r}"))
    finally:
        for server in servers:
            server.stop()
    best = {name: round(max(values), 2) for name, values in runs.items()}
    committee = best["committee_4_2_1"]
    return {"concurrency_per_teacher": concurrency, "requests": n, "repeats": repeats,
            "ideal_requests_per_s": {"committee_4_2_1": round(sum(serving), 1),
                                     **{f"single_{int(l * 1000)}ms": round(concurrency / l, 1) for l in LATENCIES}},
            "requests_per_s_best": best, "runs": runs,
            "speedup_committee_4_2_1_over": {f"single_{int(l * 1000)}ms": round(committee / best[f"single_{int(l * 1000)}ms"], 2)
                                             for l in LATENCIES},
            "speedup_committee_1_1_1_over_single_100ms": round(best["committee_1_1_1"] / best["single_100ms"], 2)}


def bench_ingest(rows: int) -> dict:
    requests = [Request.build(f"alpaca/{i // 5}/{i % 5}", f"Prompt {i}", {"max_tokens": 512}, []) for i in range(rows)]
    ids = {f"{i:032x}": r for i, r in enumerate(requests)}
    text = " ".join(["The answer explains the task in a sentence of ordinary length."] * 6)
    lines = []
    for rid in ids:
        body = {"id": f"cmpl-{rid}", "object": "text_completion", "created": 0, "model": "gpt-3.5-turbo-instruct",
                "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 300, "completion_tokens": 90, "total_tokens": 390}}
        lines.append(json.dumps({"id": f"req-{rid}", "custom_id": rid, "error": None,
                                 "response": {"status_code": 200, "request_id": rid, "body": body}}))
    blob = ("\n".join(lines) + "\n").encode()
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(Path(tmp) / "journal.jsonl")
        start, cpu = time.perf_counter(), time.process_time()
        added, answered = ingest_lines(blob, ids, journal, "completions", "batch_bench")
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        journal.close()
    assert added == len(answered) == rows
    return {"rows": rows, "file_bytes": len(blob), "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
            "rows_per_s": round(rows / seconds), "rows_per_s_cpu": round(rows / cpu_seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=420)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=52000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "committee.json")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.repeats, args.rows = 84, 1, 2000
    os.environ.setdefault("OPENAI_API_KEY", "dummy")   # the fake servers accept any key
    load_before = load_average()
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "committee": bench_committee(args.concurrency, args.requests, args.repeats),
              "batch_ingest": bench_ingest(args.rows)}
    result["machine"] = machine(load_before)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("committee", "batch_ingest")}, indent=2)[:3000])


if __name__ == "__main__":
    main()
