"""Accelerator training throughput: our jitted JAX step vs Hugging Face `LlamaForCausalLM`
(PyTorch, `sdpa` attention, eager and `torch.compile`), on whatever device each framework sees.

Two shapes, both trained on packed Alpaca-length rows (seq 2048) with bf16 compute over fp32
master weights, AdamW and global-norm clipping on both sides:

  (a) `llama7b_width`: LLaMA-7B width (hidden 4096, 32 heads, MLP 11008) with 4 layers;
  (b) `tinyllama_1b`: the 1.1B TinyLlama shape (hidden 2048, 22 layers, 32 heads, 4 kv
      heads, MLP 5632, vocab 32000).

For each it reports tokens/s (median step after compile), MFU against the device's published
dense bf16 peak (table below), peak device memory (`memory_stats`) beside the planner's
per-device bytes (`alpaca_jax.train.plan`), the attention implementation `model.attention=auto`
chose and the loss (plain or chunked), and an attention-only timing of every implementation
this platform can run (how `auto`'s choice can be checked). Each framework and shape runs in
its own subprocess, so peak memory is per run and JAX's allocator never meets PyTorch's.

MFU counts model FLOPs only (no remat recompute): per token 6 x the matmul parameters
(embedding lookup excluded, output head included) plus 6 x layers x heads x head_dim x seq for
causal attention (the 12 L D T of PaLM's appendix B, halved for the causal mask; packing
boundaries are not subtracted). HF gets the packed rows' `position_ids` (restarting per example)
and `use_cache=False`, from which transformers 5 builds the block-diagonal causal mask itself
(`masking_utils.find_packed_sequence_indices`): both sides compute the same exact function,
HF's `sdpa` through its masked path, since a mask rules out its flash backend.

    python benchmarks/accelerator.py          # the GPU/TPU run: both shapes (< 8 min on one H100)
    python benchmarks/accelerator.py --quick  # tiny shapes: the CPU smoke run (the HF side is
                                              # slow there: bf16 autocast and inductor on CPU)

Results go to benchmarks/results/accelerator_<platform>[_quick].json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from machine import load_average, machine  # this folder (a script's own is on sys.path)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
ALPACA_FILE = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"

# Published dense bf16 peaks (no sparsity), FLOP/s, by `device_kind` prefix.
PEAK_BF16 = {
    "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12, "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12, "NVIDIA GH200": 989e12, "NVIDIA B200": 2250e12,
    "NVIDIA A100": 312e12, "NVIDIA A10G": 70e12, "NVIDIA L4": 121e12, "NVIDIA L40S": 362e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}

SHAPES = {
    "llama7b_width": dict(model=dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                     num_layers=4, num_heads=32, num_kv_heads=32), seq=2048, batch=4),
    "tinyllama_1b": dict(model=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                    num_layers=22, num_heads=32, num_kv_heads=4), seq=2048, batch=8),
}
QUICK_SHAPES = {  # the same two layouts (MHA, GQA), CPU-sized
    "llama7b_width": dict(model=dict(vocab_size=2048, hidden_size=128, intermediate_size=352,
                                     num_layers=2, num_heads=4, num_kv_heads=4), seq=256, batch=2),
    "tinyllama_1b": dict(model=dict(vocab_size=2048, hidden_size=128, intermediate_size=352,
                                    num_layers=3, num_heads=4, num_kv_heads=2), seq=256, batch=2),
}


# -- shared by both workers -------------------------------------------------------------------
def packed_batch(seq: int, batch: int, vocab: int, seed: int = 0) -> tuple[dict, dict]:
    """[batch, seq] packed rows of Alpaca-length examples (random token ids).

    Lengths come from ../shared/data/alpaca_en_demo.json when present (words x 1.3 tokens per
    word + 30 for the prompt template), else from a log-normal with the same median (~170).
    """
    import numpy as np

    from alpaca_jax.data.packing import pack_rows, plan_rows

    rng = np.random.default_rng(seed)
    if ALPACA_FILE.is_file():
        rows = json.loads(ALPACA_FILE.read_text())
        words = [len(" ".join((r["instruction"], r.get("input", ""), r["output"])).split()) for r in rows]
        lengths = (np.asarray(words) * 1.3 + 30).astype(int)
        source = "alpaca_en_demo.json word counts x 1.3 + 30"
    else:
        lengths = rng.lognormal(np.log(170), 0.6, 4000).astype(int)
        source = "log-normal, median 170 tokens"
    lengths = np.clip(rng.choice(lengths, 64 * batch), 16, seq)
    ids = [rng.integers(3, vocab, n).astype(np.int32) for n in lengths]
    masks = [np.arange(n) >= n // 3 for n in lengths]  # a prompt, then the response
    plan = plan_rows([n - 1 for n in lengths], range(len(lengths)), seq)[:batch]
    packed = pack_rows(plan, ids, masks, seq, pad_id=0)
    stats = {"length_source": source, "examples": sum(len(r) for r in plan),
             "fill": float((packed["segment_ids"] > 0).mean())}
    return packed, stats


def model_flops_per_token(m: dict, seq: int) -> float:
    head_dim = m["hidden_size"] // m["num_heads"]
    d, f, layers = m["hidden_size"], m["intermediate_size"], m["num_layers"]
    per_layer = d * (m["num_heads"] + 2 * m["num_kv_heads"]) * head_dim + m["num_heads"] * head_dim * d + 3 * d * f
    matmul_params = layers * per_layer + m["vocab_size"] * d
    return 6 * matmul_params + 6 * layers * m["num_heads"] * head_dim * seq


def _peak_rss() -> int:
    """This process's peak resident memory: the only peak a CPU run has (no memory_stats)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


# -- the JAX worker --------------------------------------------------------------------------
def _xla_step_bytes(memory) -> int | None:
    """Device bytes of a compiled step by XLA's buffer assignment (None where not reported)."""
    if memory is None:
        return None
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
               + memory.temp_size_in_bytes)



def _attention_timings(cfg_model, seq: int, batch: int, segments, reps: int) -> dict:
    """Forward + backward of attention alone, per implementation this platform can run."""
    import jax
    import jax.numpy as jnp

    from alpaca_jax.model.attention import FUSED_KERNELS, attend

    platform = jax.default_backend()
    n, k, h = cfg_model.num_heads, cfg_model.num_kv_heads, cfg_model.resolved_head_dim
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, seq, n, h), jnp.bfloat16)
    kv = [jax.random.normal(kk, (batch, seq, k, h), jnp.bfloat16) for kk in keys[1:]]
    candidates = ["xla", "chunked"] + [kernel for kernel, p in FUSED_KERNELS.items() if p == platform]
    out = {}

    def timed(fn):
        grad = jax.jit(jax.grad(lambda q_, k_, v_: jnp.sum(fn(q_, k_, v_).astype(jnp.float32)), argnums=(0, 1, 2)))
        jax.block_until_ready(grad(q, *kv))
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            jax.block_until_ready(grad(q, *kv))
            times.append(time.perf_counter() - start)
        return round(_median(times) * 1e3, 3)

    for name in candidates:
        try:
            out[name] = timed(lambda q_, k_, v_: attend(q_, k_, v_, segments, name))
        except Exception as error:  # a kernel that cannot compile here is a finding, not a crash
            out[name] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    if platform == "gpu":  # cuDNN takes no segment ids: timed unpacked (causal only), for reference
        try:
            out["cudnn_unpacked_reference"] = timed(lambda q_, k_, v_: jax.nn.dot_product_attention(
                q_, k_, v_, is_causal=True, implementation="cudnn"))
        except Exception as error:
            out["cudnn_unpacked_reference"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return {"fwd_bwd_ms": out}


def jax_worker(shape: dict, steps: int, attention_timings: bool = True) -> dict:
    import dataclasses
    import functools

    import jax
    import jax.numpy as jnp

    from alpaca_jax.config import Config, DataConfig, MeshConfig, ModelConfig, OptimizerConfig, TrainConfig
    from alpaca_jax.model import Llama, init_params, logical_axes
    from alpaca_jax.model.attention import AttentionShape, select_attention
    from alpaca_jax.train.plan import plan_memory
    from alpaca_jax.train.loss import run_loss_chunk
    from alpaca_jax.train.optim import learning_rate_schedule, make_optimizer
    from alpaca_jax.train.state import fresh_train_state
    from alpaca_jax.train.step import train_step

    device = jax.devices()[0]
    platform = jax.default_backend()
    seq, batch = shape["seq"], shape["batch"]
    model_cfg = ModelConfig(**shape["model"], dtype="bfloat16", param_dtype="float32", attention="auto",
                            scan_layers=True, remat="none", max_position_embeddings=seq)
    cfg = Config(model=model_cfg, data=DataConfig(max_len=seq), train=TrainConfig(batch_size=batch),
                 mesh=MeshConfig(data=1, fsdp=1, tensor=1))
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    plan = plan_memory(cfg, 1, platform)
    if limit and plan.total > 0.85 * limit:  # the planner says it would not fit: recompute blocks
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(model_cfg, remat="full"))
        plan = plan_memory(cfg, 1, platform)
    attention = select_attention("auto", platform, AttentionShape(
        model_cfg.resolved_head_dim, model_cfg.num_heads, model_cfg.num_kv_heads, batch, model_cfg.dtype))
    loss_chunk, loss_reason = run_loss_chunk(cfg, {"data": 1, "fsdp": 1, "tensor": 1})

    packed, data_stats = packed_batch(seq, batch, model_cfg.vocab_size)
    batch_arrays = {k: jnp.asarray(v)[None] for k, v in packed.items()}
    opt_cfg = OptimizerConfig(learning_rate=1e-5, schedule="constant", warmup_steps=0)
    schedule = learning_rate_schedule(opt_cfg, steps + 2)
    optimizer = make_optimizer(opt_cfg, schedule, logical_axes(cfg.model))
    state = jax.jit(lambda key: fresh_train_state(init_params(cfg.model, key), optimizer))(jax.random.key(0))
    step = jax.jit(functools.partial(train_step, model=Llama(cfg.model), optimizer=optimizer,
                                     schedule=schedule, loss_chunk=loss_chunk), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch_arrays).compile()
    memory = compiled.memory_analysis()  # XLA's own buffer plan of the step (any platform)
    state, metrics = compiled(state, batch_arrays)
    first_loss = float(metrics["loss"])
    compile_s = time.perf_counter() - start
    step = compiled
    state, metrics = step(state, batch_arrays)  # untimed, as on the PyTorch side
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch_arrays)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    step_s = _median(times)
    tokens = batch * seq
    flops = model_flops_per_token(shape["model"], seq) * tokens
    peak = next((v for k, v in PEAK_BF16.items() if device.device_kind.startswith(k)), None)
    stats = device.memory_stats() or {}
    xla_bytes = _xla_step_bytes(memory)
    return {
        "device_kind": device.device_kind, "platform": platform, "jax_version": jax.__version__,
        "attention": attention.implementation, "attention_reason": attention.reason,
        "loss": loss_reason, "remat": cfg.model.remat, "data": data_stats,
        "compile_s": round(compile_s, 2), "step_s": round(step_s, 4), "step_s_all": [round(t, 4) for t in times],
        "tokens_per_s": round(tokens / step_s, 1),
        "real_tokens_per_s": round(float((packed["segment_ids"] > 0).sum()) / step_s, 1),
        "model_tflops_per_s": round(flops / step_s / 1e12, 3),
        "peak_bf16_tflops": peak and peak / 1e12,
        "mfu": round(flops / step_s / peak, 4) if peak else None,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "bytes_limit": stats.get("bytes_limit"),
        "host_peak_rss_bytes": _peak_rss(),
        "planner_bytes": {"total": plan.total, "params": plan.params, "grads": plan.grads,
                          "optimizer": plan.optimizer, "activations": plan.activations},
        "peak_over_planner": (round(stats["peak_bytes_in_use"] / plan.total, 3)
                              if stats.get("peak_bytes_in_use") else None),
        # XLA's buffer assignment for the step: arguments + outputs - donated + temporaries. On
        # CPU, which has no memory_stats, this is the peak the planner is checked against.
        "xla_step_bytes": xla_bytes,
        "xla_step_over_planner": round(xla_bytes / plan.total, 3) if xla_bytes else None,
        "first_loss": first_loss, "last_loss": float(metrics["loss"]),
        "attention_only": (_attention_timings(cfg.model, seq, batch, batch_arrays["segment_ids"][0], reps=3)
                           if attention_timings else "skipped (--no-attention-timings)"),
    }


# -- the PyTorch worker ----------------------------------------------------------------------
def torch_worker(shape: dict, steps: int, compiled: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    m, seq, batch = shape["model"], shape["seq"], shape["batch"]
    config = LlamaConfig(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
                         intermediate_size=m["intermediate_size"], num_hidden_layers=m["num_layers"],
                         num_attention_heads=m["num_heads"], num_key_value_heads=m["num_kv_heads"],
                         max_position_embeddings=seq, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device)  # fp32 master weights; bf16 compute by autocast
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    forward = torch.compile(model) if compiled else model
    packed, _ = packed_batch(seq, batch, m["vocab_size"])
    tensors = {k: torch.as_tensor(v).to(device) for k, v in packed.items()}
    mask = tensors["loss_mask"]

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            logits = forward(input_ids=tensors["input_ids"].long(), position_ids=tensors["positions"].long(),
                             use_cache=False).logits  # no cache: the packing mask is only built without one
        losses = F.cross_entropy(logits.float().flatten(0, 1), tensors["targets"].long().flatten(),
                                 reduction="none")
        loss = (losses * mask.flatten()).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    first_loss = float(step())
    compile_s = time.perf_counter() - start
    step()  # untimed: torch.compile recompiles once after the first optimizer step (seen on CPU)
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
    step_s = _median(times)
    tokens = batch * seq
    flops = model_flops_per_token(m, seq) * tokens
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if name.startswith(k)), None)
    return {
        "device": name, "torch_version": torch.__version__, "compiled": compiled,
        "compile_s": round(compile_s, 2), "step_s": round(step_s, 4), "step_s_all": [round(t, 4) for t in times],
        "tokens_per_s": round(tokens / step_s, 1), "model_tflops_per_s": round(flops / step_s / 1e12, 3),
        "mfu": round(flops / step_s / peak, 4) if peak else None,
        "peak_bytes_in_use": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "host_peak_rss_bytes": _peak_rss(),
        "first_loss": first_loss, "last_loss": float(loss),
    }


# -- the driver ------------------------------------------------------------------------------
def run_fresh_process(command: list[str], timeout: float) -> subprocess.CompletedProcess | dict:
    """`command` in a fresh process from the repository root: the finished process, or
    {"error": why} when it timed out or exited non-zero (with stderr's last line). gpu.py runs
    its workers and the other benchmark scripts through this too."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:300]}"}
    return done


def _run_worker(args: list[str], timeout: float) -> dict:
    """One measurement in a fresh process; its last stdout line is the JSON result."""
    done = run_fresh_process([sys.executable, str(Path(__file__).resolve()), *args], timeout)
    return done if isinstance(done, dict) else json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: the CPU smoke run")
    parser.add_argument("--steps", type=int, help="timed steps after compile (default 10; quick 3)")
    parser.add_argument("--shapes", default="llama7b_width,tinyllama_1b", help="comma-separated shape names")
    parser.add_argument("--skip-hf", action="store_true", help="time only our JAX step")
    parser.add_argument("--hf", default="eager,compile", help="which HF steps to time: eager, compile or both")
    parser.add_argument("--no-attention-timings", action="store_true",
                        help="skip the attention-only timings (benchmarks/gpu.py times the kernels itself)")
    parser.add_argument("--worker-timeout", type=float, default=600,
                        help="seconds each measurement (one framework, one shape) may take")
    parser.add_argument("--out", help="the JSON written (default benchmarks/results/accelerator_<platform>[_quick].json)")
    parser.add_argument("--worker", choices=["jax", "torch", "torch_compile"], help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    load_before = load_average()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    steps = args.steps or (3 if args.quick else 10)

    if args.worker:  # inside a subprocess: measure one thing, print its JSON
        shape = shapes[args.shape]
        result = (jax_worker(shape, steps, not args.no_attention_timings) if args.worker == "jax"
                  else torch_worker(shape, steps, compiled=args.worker == "torch_compile"))
        print(json.dumps(result))
        return

    started = time.perf_counter()
    report = {"command": " ".join(["python", "benchmarks/accelerator.py", *sys.argv[1:]]),
              "machine": machine(load_before), "quick": args.quick, "steps": steps, "shapes": {}}
    hf = {"eager": "torch", "compile": "torch_compile"}
    workers = ["jax"] + ([] if args.skip_hf else [hf[mode] for mode in args.hf.split(",")])
    labels = {"jax": "alpaca_jax", "torch": "hf_sdpa_eager", "torch_compile": "hf_sdpa_compile"}
    for name in args.shapes.split(","):
        entry = {"shape": shapes[name]}
        for worker in workers:
            flags = (["--worker", worker, "--shape", name, "--steps", str(steps)] + (["--quick"] if args.quick else [])
                     + (["--no-attention-timings"] if args.no_attention_timings else []))
            entry[labels[worker]] = result = _run_worker(flags, timeout=args.worker_timeout)
            print(f"{name} {labels[worker]}: " + (result.get("error") or
                  f"{result['tokens_per_s']:.0f} tokens/s, MFU {result.get('mfu')}, step {result['step_s']} s"),
                  flush=True)
        ours = entry["alpaca_jax"].get("tokens_per_s")
        for label in ("hf_sdpa_eager", "hf_sdpa_compile"):
            theirs = entry.get(label, {}).get("tokens_per_s")
            if ours and theirs:
                entry[f"speedup_vs_{label}"] = round(ours / theirs, 3)
        report["shapes"][name] = entry
    report["wall_s"] = round(time.perf_counter() - started, 1)
    first = next(iter(report["shapes"].values()))["alpaca_jax"]
    platform = first.get("platform", "unknown")
    report["device_kind"] = first.get("device_kind")
    RESULTS.mkdir(parents=True, exist_ok=True)
    output = Path(args.out) if args.out else RESULTS / f"accelerator_{platform}{'_quick' if args.quick else ''}.json"
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
