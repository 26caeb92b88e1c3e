"""Benchmark: an lm-evaluation-harness multiple-choice task, our JAX backend vs lm-eval's own
`hf` backend (PyTorch CPU) on our HF export of the same weights.

The model is the generation benchmark's `30m` shape (hidden 512, 8 layers, vocab 8192; random
init, byte-level BPE; benchmarks/generation.py builds it and its HF export). The task is
written here: --docs questions over a passage of 12 random words ("Which word came first?"),
4 answer words each, acc and acc_norm; lm-eval builds the requests (--fewshot shots from a
separate split), so both backends score the very same (context, continuation) pairs.

    ours  alpaca_jax.eval.lm_eval_backend.AlpacaJaxLM, batch_size contexts per call (each
          context run once, its 4 continuations over its cache)
    hf    lm_eval.models.huggingface.HFLM(pretrained=EXPORT, dtype=float32, device=cpu),
          batch_size requests per call

Wall time of the whole `lm_eval.simple_evaluate` (alpaca_jax.eval.harness.run_tasks) per
side, after one untimed call each (the whole task on our side, to compile its shapes; 8
questions on the `hf` side, which compiles nothing); then --repeats timed calls, the two
sides alternating, the best of each. The accuracies must be identical and the largest
per-request log-likelihood difference is reported as a check.

    python benchmarks/lm_eval.py            # ~15 min on 2 busy cores; writes benchmarks/results/lm_eval.json
    python benchmarks/lm_eval.py --quick    # smoke run: tiny shape, 40 questions
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
# This file has the name of the package it measures: its folder must not shadow `lm_eval`.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCHMARKS]
sys.path.insert(0, str(REPO))
_machine_spec = importlib.util.spec_from_file_location("machine", BENCHMARKS / "machine.py")
_machine = importlib.util.module_from_spec(_machine_spec)
_machine_spec.loader.exec_module(_machine)  # by path: this folder is off sys.path (see above) ...
sys.modules["machine"] = _machine  # ... and so for generation.py, loaded by path below
load_average, machine = _machine.load_average, _machine.machine

TASK = "bench_mc"


def _write_task(root: Path, docs: int, shots: int, seed: int = 0) -> Path:
    import numpy as np
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))

    def word():
        return "".join(rng.choice(letters, rng.integers(3, 8)))

    def row():
        passage = [word() for _ in range(12)]
        choices = [passage[0]] + [word() for _ in range(3)]
        order = rng.permutation(4)
        return {"passage": " ".join(passage), "choices": [choices[i] for i in order],
                "answer": int(np.argmax(order == 0))}

    for name, n in (("test", docs), ("train", max(shots, 1) * 4)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(row()) + "\n" for _ in range(n)))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "bench.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    train: {root / 'train.jsonl'}\n    test: {root / 'test.jsonl'}\n"
        "test_split: test\nfewshot_split: train\noutput_type: multiple_choice\n"
        'doc_to_text: "Passage: {{passage}}\\nQuestion: Which word came first?\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return tasks


def _timed(lm, manager, shots: int, limit: int | None = None) -> tuple[float, dict]:
    from alpaca_jax.eval.harness import run_tasks
    start = time.perf_counter()
    results = run_tasks(lm, [TASK], manager=manager, num_fewshot=shots, limit=limit)
    return time.perf_counter() - start, results


def _loglikelihoods(results) -> list[float]:
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return [r[0][0] for s in samples for r in s["resps"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=200, help="questions in the task (4 requests each)")
    parser.add_argument("--fewshot", type=int, default=0, help="shots per prompt")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side (alternating)")
    parser.add_argument("--quick", action="store_true", help="tiny shape, 40 questions")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lm_eval.json"))
    args = parser.parse_args()
    load_before = load_average()
    shape, docs = ("tiny", 40) if args.quick else ("30m", args.docs)

    import jax
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    from alpaca_jax.eval.lm_eval_backend import AlpacaJaxLM
    from alpaca_jax.eval.tasks import load_tasks
    from alpaca_jax.infer import load_model
    spec = importlib.util.spec_from_file_location("generation", BENCHMARKS / "generation.py")
    generation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generation)  # the 30m shape and its export, built as that benchmark builds them

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = generation._make_run(root, shape)
        manager = load_tasks([TASK], _write_task(root, docs, args.fewshot))
        ours = AlpacaJaxLM(load_model(run), batch_size=args.batch_size)
        hf = HFLM(pretrained=str(root / f"{shape}-hf"), backend="causal", batch_size=args.batch_size,
                  device="cpu", dtype=torch.float32)
        cold, _ = _timed(ours, manager, args.fewshot)   # compiles every shape the task needs
        _timed(hf, manager, args.fewshot, limit=8)       # PyTorch compiles nothing: a short call warms it
        times = {"ours": [], "hf": []}
        results = {}
        for _ in range(args.repeats):
            for name, lm in (("ours", ours), ("hf", hf)):
                seconds, results[name] = _timed(lm, manager, args.fewshot)
                times[name].append(seconds)
                print(f"{name}: {seconds:.2f} s", flush=True)
    metrics = {name: {k: v for k, v in r["results"][TASK].items() if k != "alias"} for name, r in results.items()}
    difference = max(abs(a - b) for a, b in zip(_loglikelihoods(results["ours"]), _loglikelihoods(results["hf"])))
    ours_s, hf_s = min(times["ours"]), min(times["hf"])
    report = {
        "shape": shape, "docs": docs, "requests": 4 * docs, "fewshot": args.fewshot, "batch_size": args.batch_size,
        "repeats": args.repeats, "ours_s": ours_s, "hf_s": hf_s, "speedup": hf_s / ours_s, "ours_cold_s": cold,
        "ours_all_s": times["ours"], "hf_all_s": times["hf"], "metrics_identical": metrics["ours"] == metrics["hf"],
        "acc": metrics["ours"]["acc,none"], "max_loglikelihood_difference": difference,
        "machine": machine(load_before),
        "note": "taken with the cores shared by other jobs",
        "jax": jax.__version__, "torch": torch.__version__, "lm_eval": lm_eval.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python", "benchmarks/lm_eval.py", *sys.argv[1:]]),
    }
    print(json.dumps(report, indent=2))
    if not args.quick:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
