"""Everything GPU in one run, one JSON: kernel correctness, the kernel table `auto` reads, the
Pallas tile sweep, the training step table (ours vs HF `torch.compile`), peak memory vs the
planner, and decode (ours vs transformers `generate` with its static cache).

    bash benchmarks/gpu.sh            # one H100/H200, no network: < 8 minutes
    bash benchmarks/gpu.sh --quick    # the same script at tiny shapes: the CPU smoke run

Sections, in order of what the targets need (each measurement in its own process with a
deadline; a section that fails is recorded as an error and the rest still run; the whole run
keeps to `--budget-s`):

1. kernels: every fused kernel this platform runs (GPU: pallas_flash, cudnn; TPU: splash; CPU
   in --quick: pallas_flash and splash through the Pallas interpreter) against `xla` attention
   on packed rows with GQA, values and q/k/v gradients, bf16 (and fp32 where the kernel takes
   it); then forward+backward of attention alone at both training shapes for every exact
   kernel and the jnp paths. The exact fused kernels faster than `xla`, fastest first, are the
   kernel table: written to alpaca_jax/model/kernel_table.json on a GPU/TPU (never by
   --quick), where `model.attention=auto` reads it.
2. steps: benchmarks/accelerator.py (both shapes; ours with `auto`, reading the new table, vs
   HF `torch.compile`; peak memory over the planner).
3. decode: benchmarks/generation.py --gpu (TinyLlama shape, bf16, batch 1 and 32, vs HF
   `generate` with its static cache).
4. blocks (GPU; --quick: two candidates, interpreted): tiles of the Pallas Triton kernel per
   head dim, fastest forward+backward, saved shape by shape; prints the `FLASH_BLOCK_SIZES`
   table to paste into alpaca_jax/model/fused_attention.py.
Then `targets`: each issue target with its measured value and whether it is met.

Result: benchmarks/results/gpu.json (--quick: gpu_<platform>_quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# Attention at the two training shapes (benchmarks/accelerator.py), and at --quick's.
ATTENTION_SHAPES = {
    "llama7b_width": dict(batch=4, length=2048, heads=32, kv_heads=32, head_dim=128),
    "tinyllama_1b": dict(batch=8, length=2048, heads=32, kv_heads=4, head_dim=64),
}
QUICK_ATTENTION_SHAPES = {
    "llama7b_width": dict(batch=2, length=256, heads=4, kv_heads=4, head_dim=32),
    "tinyllama_1b": dict(batch=2, length=256, heads=4, kv_heads=2, head_dim=32),
}
# Agreement with xla attention on the same inputs (as tests/test_attention.py): fp32 differs
# only in summation order; bf16 rounds the probabilities at different points (~8 bf16 ulps).
TOLERANCE = {"float32": 2e-5, "bfloat16": 3e-2}
# Tile candidates of the sweep: forward (block_q, block_k), backward block (dK/dV and dQ passes
# use one size: the kernel needs as many query as key blocks there), warps, pipeline stages.
BLOCK_CANDIDATES = [(128, 128, 32, None, 2), (128, 64, 32, None, 2), (64, 64, 32, 4, 2), (128, 128, 64, 8, 2),
                    (128, 64, 64, 4, 3), (64, 128, 32, 4, 3)]
QUICK_BLOCK_CANDIDATES = BLOCK_CANDIDATES[:2]


# -- measurements, each run in a worker process ------------------------------------------------
def _packed(batch: int, length: int, seed: int = 0):
    """[batch, length] segment ids of Alpaca-length examples (the training benchmark's rows)."""
    import jax.numpy as jnp
    from accelerator import packed_batch
    packed, _ = packed_batch(length, batch, vocab=1000, seed=seed)
    return jnp.asarray(packed["segment_ids"])


def _qkv(shape: dict, dtype, seed: int = 0):
    import jax
    keys = jax.random.split(jax.random.key(seed), 4)
    b, t, n, k, h = (shape[x] for x in ("batch", "length", "heads", "kv_heads", "head_dim"))
    q = jax.random.normal(keys[0], (b, t, n, h), dtype)
    kv = [jax.random.normal(kk, (b, t, k, h), dtype) for kk in keys[1:3]]
    return q, kv[0], kv[1], jax.random.normal(keys[3], (b, t, n, h), dtype)


def _fwd_bwd(fn, q, k, v, segments, reps: int) -> float:
    """Median ms of forward + backward of `fn(q, k, v, segments)` (sum of the output as loss)."""
    import jax
    import jax.numpy as jnp
    grad = jax.jit(jax.grad(lambda q_, k_, v_: jnp.sum(fn(q_, k_, v_, segments).astype(jnp.float32)),
                            argnums=(0, 1, 2)))
    jax.block_until_ready(grad(q, k, v))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(grad(q, k, v))
        times.append(time.perf_counter() - start)
    return round(sorted(times)[len(times) // 2] * 1e3, 3)


def _error(error: Exception) -> str:
    return f"error: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def _fused_candidates(platform: str) -> tuple[list[str], bool]:
    """The fused kernels to check here, and whether they run interpreted (CPU: the Pallas ones)."""
    from alpaca_jax.model.attention import FUSED_KERNELS, INTERPRETABLE
    if platform == "cpu":
        return list(INTERPRETABLE), True
    return [k for k, p in FUSED_KERNELS.items() if p == platform], False


def kernels_worker(quick: bool, save=lambda result: None) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from alpaca_jax.model.attention import chunked_causal_attention, segment_causal_mask
    from alpaca_jax.model.fused_attention import KERNELS

    platform = jax.default_backend()
    fused, interpret = _fused_candidates(platform)
    xla = lambda q, k, v, s: jax.nn.dot_product_attention(q, k, v, mask=segment_causal_mask(s))
    paths = {"xla": xla, "chunked": lambda q, k, v, s: chunked_causal_attention(q, k, v, s),
             **{name: functools.partial(KERNELS[name], interpret=interpret) for name in fused}}
    # Correctness: 2 rows of 300 tokens (not a multiple of any block), GQA 8:2, head dim 64
    # (quick: 32); every fused kernel vs xla, output and the three gradients.
    check_shape = dict(batch=2, length=300, heads=8, kv_heads=2, head_dim=32 if quick else 64)
    segments = _packed(check_shape["batch"], check_shape["length"], seed=1)
    correctness = {}
    for name in fused:
        for dtype in ("bfloat16", "float32"):
            q, k, v, cotangent = _qkv(check_shape, jnp.dtype(dtype))
            try:
                def value_and_grads(fn):
                    def loss(q_, k_, v_):
                        out = fn(q_, k_, v_, segments)
                        return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out
                    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
                    return [np.asarray(x, np.float32) for x in (out, *grads)]
                ours, reference = value_and_grads(paths[name]), value_and_grads(xla)
                diffs = [float(np.max(np.abs(a - b) / (1 + np.abs(b)))) for a, b in zip(ours, reference)]
                correctness[f"{name}/{dtype}"] = {"max_rel_diff": {"out": diffs[0], "dq": diffs[1], "dk": diffs[2],
                                                                   "dv": diffs[3]},
                                                  "tolerance": TOLERANCE[dtype],
                                                  "exact": max(diffs) <= TOLERANCE[dtype]}
            except Exception as error:  # e.g. cuDNN takes no fp32: recorded, not fatal
                correctness[f"{name}/{dtype}"] = {"exact": False, "error": _error(error)}
    exact = {name: correctness[f"{name}/bfloat16"]["exact"] for name in fused}
    timings = {}
    for label, shape in (QUICK_ATTENTION_SHAPES if quick else ATTENTION_SHAPES).items():
        q, k, v, _ = _qkv(shape, jnp.bfloat16)
        segments = _packed(shape["batch"], shape["length"])
        timings[label] = {}
        for name in ["xla", "chunked", *[n for n in fused if exact[n]]]:
            try:
                timings[label][name] = _fwd_bwd(paths[name], q, k, v, segments, reps=3 if quick else 5)
            except Exception as error:
                timings[label][name] = _error(error)
    return {"platform": platform, "device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
            "interpret": interpret, "correctness": correctness, "exact": exact, "fwd_bwd_ms": timings,
            "fastest_exact": fastest_exact(timings, exact)}


def fastest_exact(timings: dict, exact: dict) -> list[str]:
    """Exact fused kernels that beat xla at every shape, fastest (total time) first."""
    ok = [k for k, is_exact in exact.items() if is_exact
          and all(isinstance(t.get(k), float) and isinstance(t.get("xla"), float) and t[k] < t["xla"]
                  for t in timings.values())]
    return sorted(ok, key=lambda k: sum(t[k] for t in timings.values()))


def blocks_worker(quick: bool, save=lambda result: None) -> dict:
    """Fastest Pallas Triton tiles per head dim (bf16), at the training shapes' attention.
    `save` gets the results so far after each shape (a deadline then keeps what was measured)."""
    import jax
    import jax.numpy as jnp

    from alpaca_jax.model.fused_attention import FlashBlocks, pallas_flash_attention

    interpret = jax.default_backend() != "gpu"
    results = {}
    for label, shape in (QUICK_ATTENTION_SHAPES if quick else ATTENTION_SHAPES).items():
        q, k, v, _ = _qkv(shape, jnp.bfloat16)
        segments = _packed(shape["batch"], shape["length"])
        tried = {}
        for block_q, block_k, block_bwd, warps, stages in (QUICK_BLOCK_CANDIDATES if quick else BLOCK_CANDIDATES):
            blocks = FlashBlocks(block_q, block_k, block_bwd, block_bwd, block_bwd, block_bwd, warps, stages)
            fn = lambda q_, k_, v_, s, b=blocks: pallas_flash_attention(q_, k_, v_, s, interpret=interpret, blocks=b)
            name = f"q{block_q}_k{block_k}_bwd{block_bwd}_w{warps}_s{stages}"
            try:
                tried[name] = {"blocks": blocks.__dict__, "fwd_bwd_ms": _fwd_bwd(fn, q, k, v, segments, reps=3 if quick else 5)}
            except Exception as error:
                tried[name] = {"blocks": blocks.__dict__, "fwd_bwd_ms": _error(error)}
        timed = {n: r for n, r in tried.items() if isinstance(r["fwd_bwd_ms"], float)}
        best = min(timed, key=lambda n: timed[n]["fwd_bwd_ms"]) if timed else None
        results[label] = {"head_dim": shape["head_dim"], "tried": tried, "best": best}
        save({"interpret": interpret, "shapes": results, "table_code": _block_table_code(results)})
    return {"interpret": interpret, "shapes": results, "table_code": _block_table_code(results)}


def _block_table_code(results: dict) -> str:
    """The sweep's winners as the FLASH_BLOCK_SIZES literal for fused_attention.py."""
    best: dict[int, dict] = {}  # head dim -> the fastest winner over the shapes with that head dim
    for entry in results.values():
        if entry["best"]:
            won = entry["tried"][entry["best"]]
            if entry["head_dim"] not in best or won["fwd_bwd_ms"] < best[entry["head_dim"]]["fwd_bwd_ms"]:
                best[entry["head_dim"]] = won
    lines = ["FLASH_BLOCK_SIZES: dict[tuple[int, str], FlashBlocks] = {"]
    for head_dim, won in sorted(best.items()):
        args = ", ".join(f"{k}={v}" for k, v in won["blocks"].items())
        lines.append(f"    ({head_dim}, \"bfloat16\"): FlashBlocks({args}),")
    return "\n".join(lines + ["}"])


# -- the driver ---------------------------------------------------------------------------------
def _run(command: list[str], timeout: float) -> dict:
    """A worker or benchmark script in a fresh process, within `timeout` seconds."""
    if timeout < 20:
        return {"error": "skipped: the run's time budget is spent"}
    from accelerator import run_fresh_process
    done = run_fresh_process(command, timeout)
    return done if isinstance(done, dict) else {"stdout_tail": done.stdout.strip().splitlines()[-3:]}


def _worker(section: str, quick: bool, timeout: float, out: Path) -> dict:
    flags = ["--section", section, "--worker-out", str(out)] + (["--quick"] if quick else [])
    result = _run([sys.executable, str(Path(__file__).resolve()), *flags], timeout)
    if not out.is_file():
        return result
    saved = json.loads(out.read_text())
    return saved if "error" not in result else {**saved, "partial": result["error"]}


def write_kernel_table(kernels: dict, path: Path) -> None:
    """Merge this platform's measured order into the table `model.attention=auto` reads."""
    table = json.loads(path.read_text()) if path.is_file() else {}
    table[kernels["platform"]] = {
        "device_kind": kernels["device_kind"], "jax_version": kernels["jax_version"],
        "written_by": "benchmarks/gpu.py", "date": time.strftime("%Y-%m-%d"),
        "fwd_bwd_ms": kernels["fwd_bwd_ms"], "exact": kernels["exact"], "fastest_exact": kernels["fastest_exact"]}
    path.write_text(json.dumps(table, indent=2) + "\n")


def targets(steps: dict, decode: dict) -> dict:
    """Each issue target beside what this run measured (None: not measured here)."""
    shapes = steps.get("shapes", {})
    get = lambda shape, *keys: _dig(shapes.get(shape, {}), *keys)
    within = lambda x: None if x is None else abs(x - 1) <= 0.15
    # The device's peak over the planner's total; on CPU (no memory_stats) XLA's buffer
    # assignment of the step is the peak there is.
    peak = lambda shape: (get(shape, "alpaca_jax", "peak_over_planner")
                          or get(shape, "alpaca_jax", "xla_step_over_planner"))
    at_least = lambda x, bound: None if x is None else x >= bound
    rows = {
        "llama7b_width_mfu": (get("llama7b_width", "alpaca_jax", "mfu"), ">= 0.50", lambda x: at_least(x, 0.5)),
        "llama7b_width_vs_hf_compile": (get("llama7b_width", "speedup_vs_hf_sdpa_compile"), ">= 1.15",
                                        lambda x: at_least(x, 1.15)),
        "tinyllama_vs_hf_compile": (get("tinyllama_1b", "speedup_vs_hf_sdpa_compile"), ">= 1.0",
                                    lambda x: at_least(x, 1.0)),
        "llama7b_width_peak_over_planner": (peak("llama7b_width"), "within 15% of 1", within),
        "tinyllama_peak_over_planner": (peak("tinyllama_1b"), "within 15% of 1", within),
        "decode_batch_32_vs_hf_static": (next((_dig(d, "batch_32", "ratio") for d in decode.get("decode", {}).values()),
                                              None), ">= 1.0", lambda x: at_least(x, 1.0)),
    }
    return {name: {"measured": value, "target": words, "met": check(value)} for name, (value, words, check) in rows.items()}


def _dig(tree, *keys):
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: the CPU smoke run")
    parser.add_argument("--budget-s", type=float,
                        help="wall-clock budget of the whole run in s (default 450; --quick 1200)")
    parser.add_argument("--only", help="comma-separated sections to run (kernels, blocks, steps, decode)")
    parser.add_argument("--out", help="the JSON written (default benchmarks/results/gpu.json)")
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.section:  # inside a worker process: one section, its JSON to --worker-out
        save = lambda result: Path(args.worker_out).write_text(json.dumps(result))
        save({"kernels": kernels_worker, "blocks": blocks_worker}[args.section](args.quick, save))
        return

    started = time.perf_counter()
    budget = args.budget_s or (1200 if args.quick else 450)
    left = lambda: budget - (time.perf_counter() - started)
    sections = (args.only or "kernels,blocks,steps,decode").split(",")
    quick = ["--quick"] if args.quick else []
    report = {"command": " ".join(["python", "benchmarks/gpu.py", *sys.argv[1:]]), "quick": args.quick}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "kernels" in sections:
            report["kernels"] = kernels = _worker("kernels", args.quick, min(400 if args.quick else 150, left()),
                                                  tmp / "kernels.json")
            print(f"kernels: exact {kernels.get('exact')}, fastest exact {kernels.get('fastest_exact')}"
                  if "fastest_exact" in kernels else f"kernels: {kernels.get('error')}", flush=True)
            if "fastest_exact" in kernels and "partial" not in kernels and kernels["platform"] != "cpu" and not args.quick:
                from alpaca_jax.model.attention import KERNEL_TABLE
                write_kernel_table(kernels, KERNEL_TABLE)
                report["kernel_table"] = str(KERNEL_TABLE.relative_to(REPO))
        if "steps" in sections:  # both shapes (quick: the GQA one), ours and HF; its own JSON read back
            shapes = ["--shapes", "tinyllama_1b"] if args.quick else []
            output = tmp / "steps.json"
            # HF compiled only (the targets' baseline); gpu.py timed the kernels already.
            run = _run([sys.executable, "benchmarks/accelerator.py", *quick, *shapes, "--steps", "3" if args.quick else "6",
                        "--hf", "compile", "--no-attention-timings", "--worker-timeout",
                        str(round(max(left() / 3, 30))), "--out", str(output)], left() - 150)
            report["steps"] = json.loads(output.read_text()) if output.is_file() else run
        if "decode" in sections:
            decode_out = tmp / "decode.json"
            run = _run([sys.executable, "benchmarks/generation.py", "--gpu", *quick, "--repeats", "2",
                        "--new-tokens", "32", "--out", str(decode_out)], left() - 60)
            report["decode"] = json.loads(decode_out.read_text()) if decode_out.is_file() else run
        if "blocks" in sections:
            report["blocks"] = blocks = _worker("blocks", args.quick, min(200 if args.quick else 120, left()),
                                                tmp / "blocks.json")
            print(blocks.get("table_code") or f"blocks: {blocks.get('error')}", flush=True)
    report["targets"] = targets(report.get("steps", {}), report.get("decode", {}))
    report["wall_s"] = round(time.perf_counter() - started, 1)
    platform = (report.get("kernels") or {}).get("platform", "unknown")
    out = Path(args.out) if args.out else RESULTS / ("gpu.json" if not args.quick else f"gpu_{platform}_quick.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"targets: {json.dumps(report['targets'])}")
    print(f"wrote {out} ({report['wall_s']} s)")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
