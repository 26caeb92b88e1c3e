"""Benchmark: how dedup time grows with the stream, today's code against an earlier commit's.

Three corpora at each count (default 13,000, 26,000, 52,000 instructions):
- `frames`: a weak teacher's instructions, ten sentence frames filled from ~150 slot words
  (`data_gen.synthetic.small_vocabulary_stream`): many pairs share most of their words;
- `bags`: 6-24 words from ~260 in random order (`word_bag_stream`): the pairs share far more
  words than their LCS, the worst case for overlap bounds;
- `real`: the real instructions in ../shared/data followed by variants (`instruction_stream`),
  the corpus of benchmarks/dedup.py.

The baseline is `data_gen/dedup.py` as of `--baseline` (read with `git show`, run against
today's `data_gen/rouge.py`, whose functions it uses unchanged). Both run in this process, one
after the other on the same stream, and both must keep exactly the same rows. Times are this
process's CPU seconds (`time.process_time`) and wall seconds; `--baseline-max` skips the
baseline above a count (it is quadratic on `bags`).

    python benchmarks/dedup_scaling.py --out benchmarks/results/dedup_scaling.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import load_average, machine  # noqa: E402  (this folder, on sys.path)

from data_gen.dedup import deduplicate  # noqa: E402
from data_gen.synthetic import instruction_stream, small_vocabulary_stream, word_bag_stream  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def _baseline(commit: str):
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:data_gen/dedup.py"],
                            check=True, capture_output=True, text=True).stdout
    # ROUGE moved from data_gen/rouge.py to alpaca_jax/llm/rouge.py (same functions, unchanged).
    source = source.replace("from data_gen.rouge import", "from alpaca_jax.llm.rouge import")
    path = Path("/tmp") / f"dedup_baseline_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"dedup_baseline_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _real(count: int, seed: int) -> list[str]:
    texts = [json.loads(line)["instruction"] for line in (SHARED / "seed_tasks.jsonl").open()]
    texts += [json.loads(line)["instruction"] for line in (SHARED / "user_oriented_instructions.jsonl").open()]
    texts += [r["instruction"] for r in json.loads((SHARED / "alpaca_en_demo.json").read_text())]
    return instruction_stream(texts, count, seed=seed)


CORPORA = {"frames": small_vocabulary_stream, "bags": word_bag_stream, "real": _real}


def _timed(fn, texts):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(texts, 0.7)
    return result, round(time.perf_counter() - wall, 3), round(time.process_time() - cpu, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[13_000, 26_000, 52_000])
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    parser.add_argument("--baseline", default="03d3349", help="commit whose data_gen/dedup.py is the baseline")
    parser.add_argument("--baseline-max", type=int, default=52_000, help="no baseline above this count")
    parser.add_argument("--baseline-max-bags", type=int, default=26_000,
                        help="the same for `bags` (the baseline takes minutes there)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dedup_scaling.json")
    args = parser.parse_args()
    if "real" in args.corpora and not SHARED.is_dir():
        print(f"error: {SHARED} is absent (corpus `real` reads it; drop it with --corpora)", file=sys.stderr)
        return 2
    baseline = _baseline(args.baseline)
    load_before = load_average()
    rows = []
    for corpus in args.corpora:
        stream = CORPORA[corpus](max(args.counts), 0)
        for count in args.counts:
            texts = stream[:count]
            ours, wall, cpu = _timed(deduplicate, texts)
            row = {"corpus": corpus, "instructions": count, "kept": len(ours.kept),
                   "ours_seconds": wall, "ours_cpu_seconds": cpu}
            limit = args.baseline_max_bags if corpus == "bags" else args.baseline_max
            if count <= limit:
                theirs, wall, cpu = _timed(baseline.deduplicate, texts)
                assert theirs.kept == ours.kept, f"decisions differ from the baseline on {corpus} {count}"
                row.update({"baseline_seconds": wall, "baseline_cpu_seconds": cpu, "decisions_equal": True})
            print(json.dumps(row), flush=True)
            rows.append(row)
    for corpus in args.corpora:
        mine = {r["instructions"]: r for r in rows if r["corpus"] == corpus}
        lo, hi = min(mine), max(mine)
        for key in ("ours_cpu_seconds", "baseline_cpu_seconds"):
            if key in mine[lo] and key in mine[hi]:
                rows.append({"corpus": corpus, "growth": f"{hi}/{lo}", "of": key,
                             "ratio": round(mine[hi][key] / mine[lo][key], 2)})
    report = {
        "benchmark": "dedup time against stream length, data_gen.dedup now vs an earlier commit",
        "command": "python benchmarks/dedup_scaling.py " + " ".join(sys.argv[1:]),
        "baseline_commit": args.baseline,
        "notes": "CPU seconds of this process (time.process_time) and wall seconds; the machine's "
                 "cores were shared with other jobs (load average below).",
        "machine": machine(load_before),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
