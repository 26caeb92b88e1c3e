"""Benchmark: incremental ROUGE-L dedup of 10,000 and 52,000 instructions, ours vs the reference.

The reference is stanford_alpaca's loop: every candidate is scored against every instruction
kept so far with rouge-score's `_score_lcs` on pre-tokenized text (all pairs, then the max, as
`generate_instruction.py` does), single process. The instructions are the real ones in
`../shared/data/` (seed tasks, user-oriented tasks, alpaca_en_demo) followed by generated
variants and near-duplicates (`data_gen.synthetic`) up to the count.

The full reference costs ~N²/2 pair scorings (about 20 minutes at 10,000 and 8 hours at
52,000 on one core), so by default it is measured exactly on a prefix of the stream (every
decision compared) and on a random sample of later candidates (each scored against the pool
that precedes it, decisions compared), and its total time is extrapolated from the measured
time per pair times the exact number of pairs the full loop would score. `--full-reference`
runs it completely instead.

Both sides are timed in wall-clock seconds and in CPU seconds of this process
(`time.process_time`): on a machine shared with other work the wall-clock ratio is the
contended figure, while CPU time leaves out the time spent waiting for a core, which is what an
uncontended run's wall time comes down to. The load average before and after is recorded.

    python benchmarks/dedup.py            # 10,000 instructions -> benchmarks/results/dedup.json
    python benchmarks/dedup.py --quick    # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
from rouge_score import rouge_scorer, tokenize

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import load_average, machine  # noqa: E402  (this folder, on sys.path)

from data_gen.dedup import deduplicate  # noqa: E402
from data_gen.synthetic import instruction_stream  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
THRESHOLD = 0.7


def real_instructions(data: Path) -> list[str]:
    texts = [json.loads(line)["instruction"] for line in (data / "seed_tasks.jsonl").open()]
    texts += [json.loads(line)["instruction"] for line in (data / "user_oriented_instructions.jsonl").open()]
    texts += [r["instruction"] for r in json.loads((data / "alpaca_en_demo.json").read_text())]
    return texts


class _Clock:
    """Wall-clock and CPU seconds accumulated over the timed sections."""

    def __init__(self):
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


def reference_scores(tokens: list[str], pool: list[list[str]]) -> list[float]:
    return [rouge_scorer._score_lcs(tokens, other).fmeasure for other in pool]


def run(data: Path, count: int, prefix: int, sample: int, full: bool, seed: int) -> dict:
    stream = instruction_stream(real_instructions(data), count, seed=seed)
    ours_clock, reference_clock = _Clock(), _Clock()
    with ours_clock:
        ours = deduplicate(stream, THRESHOLD)
    keep = np.zeros(count, bool)
    keep[ours.kept] = True
    kept_before = np.concatenate([[0], np.cumsum(keep)[:-1]])  # pool size seen by each candidate
    total_pairs = int(kept_before.sum())

    # Reference, exactly, on a prefix of the stream (or all of it).
    tokens = [tokenize.tokenize(t, None) for t in stream]
    limit = count if full else min(prefix, count)
    pool: list[list[str]] = []
    mismatches = 0
    for i in range(limit):
        with reference_clock:
            duplicate = max(reference_scores(tokens[i], pool), default=0.0) > THRESHOLD
        mismatches += int(duplicate == keep[i])
        if not duplicate:
            pool.append(tokens[i])
    prefix_pairs = int(kept_before[:limit].sum())

    # Reference on sampled later candidates, each against the pool our run had at that point
    # (identical to the reference's own pool as long as every earlier decision agreed).
    sampled_pairs, sampled = 0, []
    if not full and limit < count:
        rng = random.Random(seed)
        sampled = sorted(rng.sample(range(limit, count), min(sample, count - limit)))
        kept_idx = np.flatnonzero(keep)
        for i in sampled:
            pool_i = [tokens[j] for j in kept_idx[kept_idx < i]]
            with reference_clock:
                duplicate = max(reference_scores(tokens[i], pool_i), default=0.0) > THRESHOLD
            sampled_pairs += len(pool_i)
            mismatches += int(duplicate == keep[i])
    measured_pairs = max(1, prefix_pairs + sampled_pairs)
    per_pair = reference_clock.wall / measured_pairs
    per_pair_cpu = reference_clock.cpu / measured_pairs
    reference_s = reference_clock.wall if full else per_pair * total_pairs
    reference_cpu_s = reference_clock.cpu if full else per_pair_cpu * total_pairs
    return {
        "instructions": count,
        "kept": len(ours.kept),
        "dropped": len(ours.dropped),
        "ours_seconds": round(ours_clock.wall, 3),
        "ours_cpu_seconds": round(ours_clock.cpu, 3),
        "reference_seconds": round(reference_s, 1),
        "reference_cpu_seconds": round(reference_cpu_s, 1),
        "reference_extrapolated": not full,
        "reference_pairs_total": total_pairs,
        "reference_pairs_measured": prefix_pairs + sampled_pairs,
        "reference_us_per_pair": round(per_pair * 1e6, 2),
        "reference_cpu_us_per_pair": round(per_pair_cpu * 1e6, 2),
        "reference_checked": {"prefix": limit, "sampled_later_candidates": len(sampled)},
        "decision_mismatches": mismatches,
        "decisions_equal": mismatches == 0,
        "speedup": round(reference_s / ours_clock.wall, 1),
        "speedup_cpu": round(reference_cpu_s / ours_clock.cpu, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000],
                        help="stream sizes (default 10000, ~1.5 min on one quiet core; 52000 takes ~5)")
    parser.add_argument("--prefix", type=int, default=1_500, help="candidates checked by the full reference")
    parser.add_argument("--sample", type=int, default=100, help="later candidates checked by the reference")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 instructions, small reference")
    parser.add_argument("--full-reference", action="store_true", help="no sampling (hours at 52,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=SHARED,
                        help="folder with seed_tasks.jsonl, user_oriented_instructions.jsonl and "
                             "alpaca_en_demo.json (default ../shared/data)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dedup.json")
    args = parser.parse_args()
    if args.quick:
        args.counts, args.prefix, args.sample = [2_000], 300, 20
    if not args.data.is_dir():
        print(f"error: {args.data} is absent (the benchmark uses the real instructions there; --data)",
              file=sys.stderr)
        return 2
    load_before = load_average()
    results = []
    for count in args.counts:
        result = run(args.data, count, args.prefix, args.sample, args.full_reference, args.seed)
        print(json.dumps(result), flush=True)
        results.append(result)
    assert all(r["decisions_equal"] for r in results), "decisions differ from rouge-score"
    report = {
        "benchmark": "incremental ROUGE-L dedup (threshold 0.7), data_gen.dedup vs rouge-score per-pair loop",
        "command": "python benchmarks/dedup.py " + " ".join(sys.argv[1:]),
        "notes": ("Reference = rouge_scorer._score_lcs on pre-tokenized text against every kept "
                  "instruction, single process. Unless reference_extrapolated is false, it ran "
                  "exactly on the first `prefix` candidates and on `sampled_later_candidates` "
                  "random later ones (decisions compared on all of them), and its total time is "
                  "us_per_pair x the exact number of pairs the full loop scores. *_seconds are "
                  "wall clock (contended when the machine is shared); *_cpu_seconds are this "
                  "process's CPU time, the figure an uncontended run approaches."),
        "machine": machine(load_before, numpy=np.__version__),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
