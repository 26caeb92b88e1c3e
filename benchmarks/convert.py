"""Benchmark: HF <-> ours conversion of a ~1.1B LLaMA, beside transformers' own load and save.

The model has TinyLlama-1.1B's shapes (hidden 2048, 22 layers, 32 heads with 4 KV heads, MLP
5632, vocab 32000; 1,100,048,384 parameters) with random bf16 weights written once by
transformers' `save_pretrained` (sharded at 1GB, as hub checkpoints are). Each phase runs in a
fresh process and reports its wall time and peak resident memory (`ru_maxrss`):

    transformers_load   AutoModelForCausalLM.from_pretrained(HF dir, dtype=bfloat16)
    transformers_save   ... then save_pretrained(...) (the peak includes the load)
    import_hf           alpaca_jax.hf.import_hf(HF dir, OUT): Orbax params + config.yaml
    export_hf           alpaca_jax.hf.export_hf(OUT, HF dir 2): safetensors + config.json
    verify              every exported tensor equal, bit for bit, to the source (not timed against anything)

The weights are 2.2 GB in bf16, so "near one copy" means a peak of about 2.2 GB plus the
interpreter and libraries (the `baseline` phase: imports only).

    python benchmarks/convert.py            # writes benchmarks/results/convert.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import load_average, machine  # noqa: E402  (this folder, on sys.path)

SHAPES = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
              num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
              rms_norm_eps=1e-5, tie_word_embeddings=False)
PHASES = ("baseline", "transformers_load", "transformers_save", "import_hf", "export_hf", "verify")


def _create(work: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES, dtype="bfloat16"))
    model.save_pretrained(work / "source", max_shard_size="1GB")


def _phase(name: str, work: Path) -> dict:
    """Run one phase in this process; returns what it measured."""
    import alpaca_jax.hf  # noqa: F401  (imports are the baseline, outside the timings)
    import torch
    import transformers
    start = time.perf_counter()
    extra = {}
    if name == "create":
        _create(work)
    elif name == "transformers_load":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            work / "source", local_files_only=True, dtype=torch.bfloat16)
        extra["parameters"] = sum(p.numel() for p in model.parameters())
    elif name == "transformers_save":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            work / "source", local_files_only=True, dtype=torch.bfloat16)
        loaded = time.perf_counter()
        model.save_pretrained(work / "transformers_saved", max_shard_size="1GB")
        extra["save_only_s"] = time.perf_counter() - loaded
    elif name == "import_hf":
        alpaca_jax.hf.import_hf(work / "source", work / "ours")
    elif name == "export_hf":
        alpaca_jax.hf.export_hf(work / "ours", work / "exported", max_shard_size=1024**3)
    elif name == "verify":
        from alpaca_jax.hf.tensor_files import SafetensorsReader
        source, exported = SafetensorsReader(work / "source"), SafetensorsReader(work / "exported")
        assert sorted(source.names()) == sorted(exported.names())
        for tensor in source.names():
            a, b = source.get(tensor), exported.get(tensor)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), tensor
        extra["tensors_identical"] = len(source.names())
    wall = time.perf_counter() - start
    return {"wall_s": round(wall, 2), "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
            **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/alpaca-jax-convert-bench", help="scratch directory (~9 GB)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "convert.json"))
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase, print JSON
    args = parser.parse_args()
    load_before = load_average()
    work = Path(args.work)
    if args.phase:
        print(json.dumps(_phase(args.phase, work)))
        return

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--work", str(work), "--phase", "create"], check=True)
    print(f"created the source model in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    results = {}
    for phase in PHASES:
        proc = subprocess.run([sys.executable, __file__, "--work", str(work), "--phase", phase],
                              capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if proc.returncode != 0:
            raise SystemExit(f"phase {phase} failed:\n{proc.stderr[-3000:]}")
        results[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(phase, results[phase], file=sys.stderr)
    weights_gb = sum(f.stat().st_size for f in (work / "source").glob("*.safetensors")) / 1e9
    report = {
        "model": {**SHAPES, "parameters": results["transformers_load"]["parameters"], "dtype": "bfloat16",
                  "safetensors_gb": round(weights_gb, 3)},
        "phases": results,
        "machine": machine(load_before),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
