"""Benchmark: llama.cpp on our GGUF exports vs our own JAX decode, and the export itself.

Decode (CPU, batch 1): the generation benchmark's `30m` shape (hidden 512, 8 layers, vocab 8192;
random init std 0.02 and a BPE that fills the vocabulary: benchmarks/generation.py `_make_run`),
exported with `export-gguf` as f16, q8_0 and q4_0 and run by llama.cpp through llama-cpp-python
(its greedy sampler; all cores, and one thread: llama.cpp's threads spin-wait for each other,
which a core busy with other work makes costly), beside our KV-cached greedy decode of the same run
(`decode_rows`, EOS disabled). Both sides: BOS + 32 prompt tokens, N new tokens, tokens/s = N /
wall time of the whole call (prefill included) after an untimed warm-up call; `--repeats` timed
calls per side, all sides alternating, the best of each.

Export: a ~1.1B run (TinyLlama-1.1B's shapes, as benchmarks/convert.py: hidden 2048, 22 layers,
32 heads / 4 KV heads, MLP 5632, vocab 32000; random bf16 params) exported as f16 and q8_0, each
in a fresh process: wall time and peak resident memory (`ru_maxrss`).

    python benchmarks/gguf_export.py            # writes benchmarks/results/gguf.json
    python benchmarks/gguf_export.py --quick    # smoke run: tiny shape, no 1B export

(Not named gguf.py: Python puts this folder first on sys.path, and the file would shadow the
`gguf` package it benchmarks.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this folder is already on sys.path (the script's own)
from machine import load_average, machine  # noqa: E402  (this folder, on sys.path)

from generation import PROMPT_TOKENS, _interleaved_best, _make_run, _NoEos, _ours_call, _prompts  # noqa: E402

TYPES = ("f16", "q8_0", "q4_0")
BIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
           num_kv_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, param_dtype="bfloat16")
BIG_TYPES = ("f16", "q8_0")


def _llama_cpp_call(path: Path, prompt: list[int], new_tokens: int, threads: int):
    """A function that decodes `new_tokens` greedily with llama.cpp and returns its wall time."""
    from llama_cpp import Llama
    llm = Llama(str(path), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False)

    def call() -> float:
        start = time.perf_counter()
        count = 0
        for _ in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):  # never stops at EOS
            count += 1
            if count == new_tokens:
                break
        return time.perf_counter() - start
    call()  # warm-up
    return call


def decode(shape: str, new_tokens: int, repeats: int, work: Path) -> dict:
    from alpaca_jax.gguf_export import export_gguf
    from alpaca_jax.infer import load_model
    from alpaca_jax.model import count_params
    run = _make_run(work, shape)
    exports = {}
    for gguf_type in TYPES:
        start = time.perf_counter()
        path = export_gguf(run, work / f"{shape}-{gguf_type}.gguf", type=gguf_type)
        exports[gguf_type] = {"export_s": time.perf_counter() - start, "bytes": path.stat().st_size}
    model = load_model(run)
    model = dataclasses.replace(model, tokenizer=_NoEos(model.tokenizer, model.config.vocab_size))
    prompt = [model.tokenizer.bos_token_id] + [int(t) for t in _prompts(1, model.config.vocab_size)[0]]
    calls = {"ours": _ours_call(model, 1, new_tokens)}
    for gguf_type in TYPES:
        for threads in sorted({os.cpu_count(), 1}, reverse=True):
            calls[f"llama.cpp {gguf_type}, {threads} thread{'s' if threads > 1 else ''}"] = _llama_cpp_call(
                work / f"{shape}-{gguf_type}.gguf", prompt, new_tokens, threads)
    best = _interleaved_best(calls, repeats)
    ours = new_tokens / best["ours"]
    rows = {name: {"tokens_per_s": new_tokens / wall, "wall_s": wall, "vs_ours": (new_tokens / wall) / ours}
            for name, wall in best.items()}
    return {"shape": shape, "params": count_params(model.config), "batch": 1, "new_tokens": new_tokens,
            "prompt_tokens": PROMPT_TOKENS + 1, "repeats": repeats, "exports": exports, "decode": rows}


def _make_big_run(root: Path) -> Path:
    """A ~1.1B run directory: random bf16 params (std 0.02) and a small BPE (the GGUF vocabulary
    is padded to 32000 with unused tokens)."""
    import jax
    from alpaca_jax.checkpoint import save_params
    from alpaca_jax.config import config_from_dict, save_config
    from alpaca_jax.data.templates import alpaca_prompt
    from alpaca_jax.data.tokenizer import train_bpe_tokenizer
    from alpaca_jax.model import init_params
    cfg = config_from_dict({"model": BIG})
    run = root / "1b"
    run.mkdir(parents=True)
    save_params(run, jax.jit(lambda key: init_params(cfg.model, key))(jax.random.key(0)))
    texts = [alpaca_prompt(f"Explain the number {i} in words.") for i in range(500)]
    train_bpe_tokenizer(texts, 1000, 1).save_pretrained(str(run / "tokenizer"))
    save_config(cfg, run / "config.yaml")
    return run


def _export_phase(run: str, out: str, gguf_type: str) -> dict:
    """One export in this process: wall time and peak RSS (imports excluded from the time)."""
    from alpaca_jax.gguf_export import export_gguf
    start = time.perf_counter()
    export_gguf(run, out, type=gguf_type)
    return {"wall_s": time.perf_counter() - start, "bytes": Path(out).stat().st_size,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def export_big(work: Path) -> dict:
    from alpaca_jax.model import count_params
    from alpaca_jax.config import config_from_dict
    run = _make_big_run(work)
    out = {"shape": "TinyLlama-1.1B (hidden 2048, 22 layers, 32/4 heads, MLP 5632, vocab 32000, bf16 params)",
           "params": count_params(config_from_dict({"model": BIG}).model), "exports": {}}
    for gguf_type in BIG_TYPES:
        target = work / f"1b-{gguf_type}.gguf"
        result = subprocess.run([sys.executable, __file__, "--export-phase", str(run), str(target), gguf_type],
                                capture_output=True, text=True, cwd=REPO)
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-3000:])
        out["exports"][gguf_type] = json.loads(result.stdout.splitlines()[-1])
        target.unlink()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shape only, fewer tokens, no 1B export")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per call (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side, alternating (default 5)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gguf.json"))
    parser.add_argument("--export-phase", nargs=3, metavar=("RUN", "OUT", "TYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    load_before = load_average()
    if args.export_phase:
        print(json.dumps(_export_phase(*args.export_phase)))
        return

    import jax
    import llama_cpp
    report = {"machine": machine(load_before),
              "jax": jax.__version__, "llama_cpp_python": llama_cpp.__version__,
              "command": "python benchmarks/gguf_export.py" + (" --quick" if args.quick else "")}
    with tempfile.TemporaryDirectory() as tmp:
        report["decode"] = decode("tiny" if args.quick else "30m", 16 if args.quick else args.new_tokens,
                                  args.repeats, Path(tmp))
        if not args.quick:
            report["export_1b"] = export_big(Path(tmp))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))




if __name__ == "__main__":
    main()
