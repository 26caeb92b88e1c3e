"""Training throughput: our jitted JAX step vs Hugging Face `LlamaForCausalLM` in PyTorch eager.

Two measurements, side by side in one run, written to `benchmarks/results/train_throughput.json`:

1. Raw train-step tokens/s on one fixed shape (hidden 512, 8 layers, 8 heads, intermediate 1408,
   vocab 8192, seq 512, batch 8, fp32, AdamW + global-norm clipping on both sides), with our
   MFU against a fp32 matmul peak measured in the same run. Both models start from the *same*
   weights, and the first losses are asserted equal (a cheap end-to-end parity check).
2. Examples/s on the real Alpaca length distribution (`../shared/data/alpaca_en_demo.json`):
   our packed pipeline (BPE 8192, max_len 512, `BatchIterator(packing=True)`, jitted step)
   vs the original Stanford Alpaca recipe (8 examples per batch padded to the longest one,
   loss on response tokens only, PyTorch eager), over the same tokenized examples.

Both sides share one process, so both run with the glibc allocator tuning that `alpaca-jax
train` applies (alpaca_jax/host_malloc.py); the full run then repeats the raw-step comparison
in a second process with glibc's defaults (`raw_step_default_malloc` in the JSON).

Steps are timed interleaved (one JAX, one PyTorch, ...) so that CPU contention from other
processes hits both sides alike; medians are reported with every sample.

    python benchmarks/train_throughput.py            # full run (~15 min on 2 idle cores)
    python benchmarks/train_throughput.py --quick    # fewer steps and examples
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from machine import load_average, machine  # this folder (a script's own is on sys.path)

REPO = Path(__file__).resolve().parent.parent
DATA_FILE = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"
OUTPUT = REPO / "benchmarks" / "results" / "train_throughput.json"

# Both sides run with glibc's allocator tuned so that per-step host buffers are reused rather
# than mmapped and page-faulted afresh (alpaca_jax/host_malloc.py; `alpaca-jax train` does the
# same). It is process-wide, so PyTorch gets it too; `--host-malloc default` measures both
# sides with glibc's defaults instead (the full run does that as well, in a subprocess).
if "--host-malloc" not in sys.argv[1:] or sys.argv[sys.argv.index("--host-malloc") + 1] != "default":
    from alpaca_jax.host_malloc import maybe_reexec_with_host_malloc_tuning  # noqa: E402
    maybe_reexec_with_host_malloc_tuning()

# XLA CPU flags are set here, for this benchmark only, before JAX is imported. (None so far:
# see the report in the JSON; an existing XLA_FLAGS from the caller is kept and recorded.)
XLA_FLAGS: list[str] = []
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *XLA_FLAGS]).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from alpaca_jax.config import ModelConfig, OptimizerConfig  # noqa: E402
from alpaca_jax.model import Llama, count_params, init_params, logical_axes  # noqa: E402
from alpaca_jax.train.optim import learning_rate_schedule, make_optimizer  # noqa: E402
from alpaca_jax.train.state import TrainState  # noqa: E402
from alpaca_jax.train.step import train_step  # noqa: E402

SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=8,
             num_heads=8, num_kv_heads=8, max_position_embeddings=512)
SEQ_LEN, BATCH = 512, 8
# Our settings for this shape (each measured; see the README notes / report):
# unrolled layers (8 layers compile fast; no scan residual stacking) and causal query blocks.
OURS = dict(scan_layers=False, attention="chunked", remat="none", dtype="float32",
            param_dtype="float32")
OPTIMIZER = OptimizerConfig(learning_rate=1e-4, schedule="constant", warmup_steps=0,
                            weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=1.0)


# -- helpers ------------------------------------------------------------------------------------
def _median(xs):
    return float(np.median(xs))


def matmul_peak(size: int, repeats: int) -> dict:
    """fp32 FLOPs/s of a large jitted jnp matmul (best and median of `repeats`)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    flops = 2 * size ** 3
    return {"size": size, "flops": flops, "best_flops_per_s": flops / min(times),
            "median_flops_per_s": flops / _median(times), "times_s": times}


def model_flops_per_step(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Training FLOPs of one step, PaLM convention: 6*N per token for the matmul weights (every
    layer + output head; not the embedding gather) + 12*L*T*D per token for attention scores
    (not halved for causality, so it is the usual MFU numerator)."""
    d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    kv = cfg.num_kv_heads * cfg.resolved_head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f
    matmul_params = layers * per_layer + d * cfg.vocab_size
    tokens = batch * seq
    return 6 * matmul_params * tokens + 12 * layers * seq * d * tokens


# -- our side -----------------------------------------------------------------------------------
def build_jax(cfg: ModelConfig):
    schedule = learning_rate_schedule(OPTIMIZER, 1000)
    optimizer = make_optimizer(OPTIMIZER, schedule, logical_axes(cfg))
    params = init_params(cfg, jax.random.key(0))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    step = jax.jit(functools.partial(train_step, model=Llama(cfg), optimizer=optimizer,
                                     schedule=schedule), donate_argnums=0)
    return state, step


class JaxRunner:
    """Holds the (donated) train state between timed steps."""

    def __init__(self, cfg: ModelConfig):
        self.state, self.step_fn = build_jax(cfg)
        self.params_numpy = jax.tree.map(np.asarray, self.state.params)  # for the torch copy

    def step(self, batch: dict[str, np.ndarray]) -> dict:
        batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}  # [1, B, T]: no accumulation
        self.state, metrics = self.step_fn(self.state, batch)
        return jax.device_get(metrics)


# -- the Hugging Face side ----------------------------------------------------------------------
def build_torch(cfg: ModelConfig, params) -> tuple:
    from transformers import LlamaConfig, LlamaForCausalLM
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         max_position_embeddings=cfg.max_position_embeddings,
                         rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=False,
                         attention_dropout=0.0)
    model = LlamaForCausalLM(hf_cfg)
    _copy_weights(model, params, cfg)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=OPTIMIZER.learning_rate,
                                  betas=(OPTIMIZER.b1, OPTIMIZER.b2), eps=OPTIMIZER.eps,
                                  weight_decay=OPTIMIZER.weight_decay)
    return model, optimizer


def _copy_weights(model, params, cfg: ModelConfig) -> None:
    """Our (unrolled-layer) params -> HF LLaMA state dict: renames and transposes only."""
    d = cfg.hidden_size
    sd = {"model.embed_tokens.weight": params["embedding"],
          "model.norm.weight": params["final_norm"]["scale"],
          "lm_head.weight": params["lm_head"]}
    for i in range(cfg.num_layers):
        layer = params[f"layers_{i}"] if f"layers_{i}" in params else jax.tree.map(lambda x: x[i], params["layers"])
        att, mlp, pre = layer["attention"], layer["mlp"], f"model.layers.{i}."
        sd[pre + "self_attn.q_proj.weight"] = att["wq"].reshape(d, -1).T
        sd[pre + "self_attn.k_proj.weight"] = att["wk"].reshape(d, -1).T
        sd[pre + "self_attn.v_proj.weight"] = att["wv"].reshape(d, -1).T
        sd[pre + "self_attn.o_proj.weight"] = att["wo"].reshape(-1, d).T
        sd[pre + "mlp.gate_proj.weight"] = mlp["w_gate"].T
        sd[pre + "mlp.up_proj.weight"] = mlp["w_up"].T
        sd[pre + "mlp.down_proj.weight"] = mlp["w_down"].T
        sd[pre + "input_layernorm.weight"] = layer["attention_norm"]["scale"]
        sd[pre + "post_attention_layernorm.weight"] = layer["mlp_norm"]["scale"]
    own = model.state_dict()
    missing = set(own) - set(sd) - {k for k in own if "rotary_emb" in k}
    assert not missing, f"unmapped HF weights: {sorted(missing)}"
    for name, value in sd.items():
        assert tuple(own[name].shape) == value.shape, (name, own[name].shape, value.shape)
    model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()},
                          strict=False)


class TorchRunner:
    def __init__(self, cfg: ModelConfig, params):
        self.model, self.optimizer = build_torch(cfg, params)

    def step(self, input_ids, labels, attention_mask=None) -> float:
        out = self.model(input_ids=torch.from_numpy(input_ids), labels=torch.from_numpy(labels),
                         attention_mask=None if attention_mask is None else torch.from_numpy(attention_mask))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), OPTIMIZER.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())


def _timed(fn, *args):
    t = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t, result


# -- 1. raw step --------------------------------------------------------------------------------
def raw_step_benchmark(cfg, ours: JaxRunner, theirs: TorchRunner, steps: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (BATCH, SEQ_LEN)).astype(np.int32)
    # Every position but the last predicts the next token, as HF's shifted `labels=input_ids`.
    targets = np.concatenate([ids[:, 1:], np.zeros((BATCH, 1), np.int32)], axis=1)
    loss_mask = np.ones((BATCH, SEQ_LEN), np.float32)
    loss_mask[:, -1] = 0
    batch = {"input_ids": ids, "targets": targets, "loss_mask": loss_mask,
             "segment_ids": np.ones((BATCH, SEQ_LEN), np.int32),
             "positions": np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), (BATCH, SEQ_LEN)).copy()}
    labels = ids.astype(np.int64)

    compile_s, first = _timed(ours.step, batch)
    torch_first_s, torch_loss = _timed(theirs.step, ids.astype(np.int64), labels)
    # Same weights, same tokens: the first losses must agree (fp32; summation order differs).
    assert abs(float(first["loss"]) - torch_loss) < 1e-4 * abs(torch_loss), (float(first["loss"]), torch_loss)
    for _ in range(2):  # two more untimed steps each: the first runs also grow the host heap
        ours.step(batch)
        theirs.step(ids.astype(np.int64), labels)
    jax_times, torch_times = [], []
    for _ in range(steps):  # interleaved, so background load hits both sides alike
        jax_times.append(_timed(ours.step, batch)[0])
        torch_times.append(_timed(theirs.step, ids.astype(np.int64), labels)[0])
    tokens = BATCH * SEQ_LEN
    jax_tps, torch_tps = tokens / _median(jax_times), tokens / _median(torch_times)
    return {"tokens_per_step": tokens, "steps_timed": steps,
            "first_loss": {"jax": float(first["loss"]), "torch": torch_loss},
            "jax_compile_and_first_step_s": compile_s, "torch_first_step_s": torch_first_s,
            "jax_step_s": {"median": _median(jax_times), "samples": jax_times},
            "torch_step_s": {"median": _median(torch_times), "samples": torch_times},
            "jax_tokens_per_s": jax_tps, "torch_tokens_per_s": torch_tps,
            "ratio_jax_over_torch": jax_tps / torch_tps}


# -- 2. examples/s on Alpaca lengths ------------------------------------------------------------
def load_alpaca_examples(max_len: int, num_examples: int, vocab_size: int):
    from alpaca_jax.data import load_instruction_dataset, tokenize_dataset, train_bpe_tokenizer
    from alpaca_jax.data.templates import alpaca_prompt
    from alpaca_jax.data.tokenizer import special_ids
    if not DATA_FILE.is_file():
        sys.exit(f"benchmark data not found: {DATA_FILE} (the shared data directory, "
                 f"REPO/../shared/data/alpaca_en_demo.json, is needed for the examples/s part)")
    ds = load_instruction_dataset([str(DATA_FILE)])
    texts = [alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in ds]
    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    tokenized, stats = tokenize_dataset(ds, tokenizer, max_len)
    rows = np.random.default_rng(0).permutation(len(tokenized))[:num_examples]
    input_ids = [np.asarray(tokenized[int(i)]["input_ids"], np.int32) for i in rows]
    loss_mask = [np.asarray(tokenized[int(i)]["loss_mask"], bool) for i in rows]
    return input_ids, loss_mask, special_ids(tokenizer).pad, stats


def padded_batches(input_ids, loss_mask, pad_id: int, batch_size: int):
    """The Stanford Alpaca collator: pad each batch to its longest example; labels are the ids
    with prompt and padding set to -100 (HF shifts them inside the model)."""
    for start in range(0, len(input_ids), batch_size):
        ids, masks = input_ids[start:start + batch_size], loss_mask[start:start + batch_size]
        longest = max(len(x) for x in ids)
        batch_ids = np.full((len(ids), longest), pad_id, np.int64)
        labels = np.full((len(ids), longest), -100, np.int64)
        attention = np.zeros((len(ids), longest), np.int64)
        for b, (x, m) in enumerate(zip(ids, masks)):
            batch_ids[b, :len(x)] = x
            labels[b, :len(x)] = np.where(m, x, -100)
            attention[b, :len(x)] = 1
        yield batch_ids, labels, attention


def examples_benchmark(ours: JaxRunner, theirs: TorchRunner, num_examples: int, vocab_size: int) -> dict:
    from alpaca_jax.data import BatchIterator
    input_ids, loss_mask, pad_id, stats = load_alpaca_examples(SEQ_LEN, num_examples, vocab_size)
    n = len(input_ids)
    real_tokens = int(sum(len(x) for x in input_ids))
    packed = list(BatchIterator(input_ids, loss_mask, batch_size=BATCH, seq_len=SEQ_LEN, seed=0,
                                num_epochs=1, pad_id=pad_id, packing=True))
    padded = list(padded_batches(input_ids, loss_mask, pad_id, BATCH))
    # Interleave JAX and PyTorch steps (the longer list finishes alone), then total each side.
    jax_times, torch_times, jax_tokens = [], [], 0
    for i in range(max(len(packed), len(padded))):
        if i < len(packed):
            t, metrics = _timed(ours.step, packed[i])
            jax_times.append(t)
            jax_tokens += int(metrics["tokens"])
        if i < len(padded):
            torch_times.append(_timed(theirs.step, *padded[i])[0])
    # Every example went through each side exactly once (shifted positions: tokens - 1 each).
    assert jax_tokens == real_tokens - n, (jax_tokens, real_tokens - n)
    padded_slots = sum(b[0].size for b in padded)
    jax_eps, torch_eps = n / sum(jax_times), n / sum(torch_times)
    return {
        "examples": n, "tokens": real_tokens, "tokenize_stats_full_file": stats.__dict__,
        "mean_example_tokens": real_tokens / n, "max_example_tokens": max(len(x) for x in input_ids),
        "jax_packed": {"steps": len(packed), "rows": len(packed) * BATCH,
                       "packing_efficiency": (real_tokens - n) / (len(packed) * BATCH * SEQ_LEN),
                       "step_s": {"median": _median(jax_times), "samples": jax_times},
                       "total_s": sum(jax_times), "examples_per_s": jax_eps},
        "torch_padded": {"steps": len(padded), "padding_efficiency": real_tokens / padded_slots,
                         "batch_lengths": [int(b[0].shape[1]) for b in padded],
                         "step_s": {"median": _median(torch_times), "samples": torch_times},
                         "total_s": sum(torch_times), "examples_per_s": torch_eps},
        "ratio_jax_over_torch": jax_eps / torch_eps,
    }


def default_malloc_run(steps: int) -> dict:
    """The raw-step comparison again in a fresh process with glibc's default allocator settings
    (what a user gets from plain `python train.py` with Hugging Face), for both sides."""
    out = OUTPUT.parent / "train_throughput_default_malloc.json"
    from alpaca_jax.host_malloc import DONE_VARIABLE
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", DONE_VARIABLE)}
    subprocess.run([sys.executable, __file__, "--host-malloc", "default", "--raw-only",
                    "--steps", str(steps), "--output", str(out)], env=env, check=True)
    return json.loads(out.read_text())["raw_step"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 timed raw steps, 64 examples (default 5 and 192)")
    parser.add_argument("--steps", type=int, default=None, help="timed raw steps per side (default 5)")
    parser.add_argument("--examples", type=int, default=None, help="Alpaca examples per side (default 192)")
    parser.add_argument("--host-malloc", choices=("tuned", "default"), default="tuned",
                        help="glibc allocator settings for this process (default: tuned, as `alpaca-jax train`)")
    parser.add_argument("--raw-only", action="store_true", help="only the raw-step comparison")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    load_before = load_average()
    steps = args.steps or (2 if args.quick else 5)
    num_examples = args.examples or (64 if args.quick else 192)

    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPE, **OURS)
    t0 = time.perf_counter()
    peak = matmul_peak(2048, 5 if args.quick else 10)
    ours = JaxRunner(cfg)
    theirs = TorchRunner(cfg, ours.params_numpy)
    raw = raw_step_benchmark(cfg, ours, theirs, steps)
    flops = model_flops_per_step(cfg, BATCH, SEQ_LEN)
    raw["model_flops_per_step"] = flops
    raw["jax_mfu"] = flops / raw["jax_step_s"]["median"] / peak["best_flops_per_s"]
    raw["torch_mfu"] = flops / raw["torch_step_s"]["median"] / peak["best_flops_per_s"]
    raw["host_malloc"] = args.host_malloc
    print(f"raw step ({args.host_malloc} malloc): ours {raw['jax_tokens_per_s']:.0f} tok/s, torch "
          f"{raw['torch_tokens_per_s']:.0f} tok/s ({raw['ratio_jax_over_torch']:.2f}x); MFU "
          f"{raw['jax_mfu']:.1%} vs {raw['torch_mfu']:.1%} of {peak['best_flops_per_s'] / 1e9:.0f} GFLOP/s",
          flush=True)
    examples = None
    if not args.raw_only:
        examples = examples_benchmark(ours, theirs, num_examples, SHAPE["vocab_size"])
        print(f"alpaca: ours {examples['jax_packed']['examples_per_s']:.2f} ex/s, torch "
              f"{examples['torch_padded']['examples_per_s']:.2f} ex/s ({examples['ratio_jax_over_torch']:.2f}x); "
              f"packing {examples['jax_packed']['packing_efficiency']:.1%} vs padding "
              f"{examples['torch_padded']['padding_efficiency']:.1%}", flush=True)
    default_raw = None
    if not args.raw_only and not args.quick and args.host_malloc == "tuned":
        del ours, theirs  # free this process's memory before the second one starts
        default_raw = default_malloc_run(steps)

    result = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "shape": {**SHAPE, "seq_len": SEQ_LEN, "batch": BATCH, "dtype": "float32",
                  "params": count_params(cfg)},
        "ours": {**OURS, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                 "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")},
        "torch": {"attn_implementation": "sdpa", "threads": torch.get_num_threads(), "mode": "eager"},
        "optimizer": {"name": "AdamW", "lr": OPTIMIZER.learning_rate, "max_grad_norm": OPTIMIZER.max_grad_norm},
        "matmul_peak": peak,
        "raw_step": raw,
        "raw_step_default_malloc": default_raw,
        "alpaca_examples": examples,
        "machine": machine(load_before, jax=jax.__version__, torch=torch.__version__),
        "wall_s": time.perf_counter() - t0,
        "targets": {"raw_ratio_at_least_1.0": raw["ratio_jax_over_torch"] >= 1.0,
                    "examples_ratio_at_least_2.0": None if examples is None
                    else examples["ratio_jax_over_torch"] >= 2.0},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
