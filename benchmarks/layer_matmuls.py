"""Weight matmuls of one layer, forward + backward: einsum form vs our `dense` vs PyTorch.

Why this exists: our projections used to be einsums that keep batch and length apart
("BTD,DF->BTF"). Their weight gradients then contract two dims at once ([B, T, D] x [B, T, F]
-> [D, F]), and XLA:CPU runs those markedly slower than the single GEMM that the same product
becomes on [B*T, D] activations (`alpaca_jax.model.layers.dense`). This benchmark measures
that, side by side in one run, on the train-throughput shape (batch 8, seq 512, hidden 512,
intermediate 1408, vocab 8192, fp32), for:

- the SwiGLU MLP: down(silu(x Wg) * (x Wu)), gradients for x and the three weights;
- the output head with cross-entropy, gradients for x and the head weight;

each as (a) the einsum form over [B, T, D] with [in, out] weights (our model before), (b) ours:
the model's `SwiGLU` module and its head matmul, both `dense` on [B*T, D], the head weight
stored [V, D] (its backward is faster that way), and the train step's cross-entropy,
(c) PyTorch eager `nn.functional.linear` (2 threads). Timings are interleaved, medians of
`--repeats`.

    python benchmarks/layer_matmuls.py      # ~2 min on 2 cores; writes results/layer_matmuls.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from alpaca_jax.host_malloc import maybe_reexec_with_host_malloc_tuning

maybe_reexec_with_host_malloc_tuning()  # as `alpaca-jax train` runs

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from alpaca_jax.model.layers import dense  # noqa: E402
from alpaca_jax.model.mlp import SwiGLU  # noqa: E402
from alpaca_jax.train.step import token_cross_entropy  # noqa: E402
from machine import load_average, machine  # noqa: E402  (this folder, on sys.path)

OUTPUT = Path(__file__).resolve().parent / "results" / "layer_matmuls.json"
B, T, D, F, V = 8, 512, 512, 1408, 8192


def mlp_einsum(x, w_gate, w_up, w_down):
    gate = jnp.einsum("BTD,DF->BTF", x, w_gate)
    up = jnp.einsum("BTD,DF->BTF", x, w_up)
    return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, w_down)


SWIGLU = SwiGLU(F, init_std=0.02, dtype=jnp.float32, param_dtype=jnp.float32)


def mlp_ours(x, w_gate, w_up, w_down):
    """The model's own SwiGLU module (model/mlp.py), applied to these weights."""
    return SWIGLU.apply({"params": {"w_gate": w_gate, "w_up": w_up, "w_down": w_down}}, x)


def head_loss(logits, targets):
    return jnp.sum(token_cross_entropy(logits, targets))  # the train step's loss (train/step.py)


def jax_cases(key):
    k = jax.random.split(key, 6)
    x = jax.random.normal(k[0], (B, T, D))
    mlp_w = (jax.random.normal(k[1], (D, F)) * 0.02, jax.random.normal(k[2], (D, F)) * 0.02,
             jax.random.normal(k[3], (F, D)) * 0.02)
    head_w = jax.random.normal(k[4], (D, V)) * 0.02
    targets = jax.random.randint(k[5], (B, T), 0, V)

    def mlp_grad(f):  # a sin() readout so the output cotangent is not all ones
        return jax.jit(jax.grad(lambda x, *w: jnp.sum(jnp.sin(f(x, *w))), argnums=(0, 1, 2, 3)))

    def head_grad(f):
        return jax.jit(jax.grad(lambda x, w: head_loss(f(x, w), targets), argnums=(0, 1)))

    cases = {
        ("mlp", "einsum"): (mlp_grad(mlp_einsum), (x, *mlp_w)),
        ("mlp", "ours"): (mlp_grad(mlp_ours), (x, *mlp_w)),
        ("head", "einsum"): (head_grad(lambda x, w: jnp.einsum("BTD,DV->BTV", x, w)), (x, head_w)),
        ("head", "ours"): (head_grad(lambda x, w: dense(x, w.T)), (x, head_w.T.copy())),
    }
    return cases, (x, mlp_w, head_w, targets)


def torch_cases(x, mlp_w, head_w, targets):
    """The same products as PyTorch eager runs them (weights [out, in], as nn.Linear keeps them)."""
    xt = torch.tensor(np.asarray(x), requires_grad=True)
    wg, wu, wd = (torch.tensor(np.asarray(w).T.copy(), requires_grad=True) for w in mlp_w)
    wh = torch.tensor(np.asarray(head_w).T.copy(), requires_grad=True)
    tt = torch.tensor(np.asarray(targets), dtype=torch.long)
    linear, silu = torch.nn.functional.linear, torch.nn.functional.silu

    def mlp():
        y = linear(silu(linear(xt, wg)) * linear(xt, wu), wd)
        torch.sin(y).sum().backward()
        return [t.grad for t in (xt, wg, wu, wd)]

    def head():
        logits = linear(xt, wh)
        torch.nn.functional.cross_entropy(logits.reshape(-1, V), tt.reshape(-1), reduction="sum").backward()
        return [t.grad for t in (xt, wh)]

    def fresh(fn):
        def run():
            for t in (xt, wg, wu, wd, wh):
                t.grad = None
            return fn()
        return run

    return {("mlp", "torch"): (fresh(mlp), ()), ("head", "torch"): (fresh(head), ())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    load_before = load_average()
    torch.set_num_threads(2)

    cases, tensors = jax_cases(jax.random.key(0))
    # The two JAX forms are the same function: check the gradients before timing them.
    for block in ("mlp", "head"):
        a = cases[(block, "einsum")][0](*cases[(block, "einsum")][1])
        b = cases[(block, "ours")][0](*cases[(block, "ours")][1])
        if block == "head":
            b = (b[0], b[1].T)  # ours holds the head weight transposed
        for ga, gb in zip(a, b):
            np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), rtol=2e-4, atol=1e-5)
    cases.update(torch_cases(*tensors))

    def call(fn, call_args):
        out = fn(*call_args)
        if not isinstance(out[0], torch.Tensor):  # PyTorch eager has already finished
            jax.block_until_ready(out)

    for fn, call_args in cases.values():  # compile / warm up
        call(fn, call_args)
        call(fn, call_args)
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (fn, call_args) in cases.items():
            start = time.perf_counter()
            call(fn, call_args)
            times[name].append(time.perf_counter() - start)

    flops = {"mlp": 3 * 3 * 2 * B * T * D * F, "head": 3 * 2 * B * T * D * V}  # fwd + 2 bwd matmuls
    result = {"shape": dict(batch=B, seq=T, hidden=D, intermediate=F, vocab=V, dtype="float32"),
              "repeats": args.repeats, "machine": machine(load_before),
              "jax": jax.__version__, "torch": torch.__version__, "blocks": {}}
    for block in ("mlp", "head"):
        row = {}
        for form in ("einsum", "ours", "torch"):
            median = float(np.median(times[(block, form)]))
            row[form] = {"median_ms": 1e3 * median, "gflops_per_s": flops[block] / median / 1e9,
                         "samples_ms": [1e3 * t for t in times[(block, form)]]}
        row["ours_speedup_over_einsum"] = row["einsum"]["median_ms"] / row["ours"]["median_ms"]
        row["ours_speed_over_torch"] = row["torch"]["median_ms"] / row["ours"]["median_ms"]
        result["blocks"][block] = row
        print(f"{block:5s} fwd+bwd: einsum {row['einsum']['median_ms']:6.1f} ms, "
              f"ours {row['ours']['median_ms']:6.1f} ms, torch {row['torch']['median_ms']:6.1f} ms "
              f"(ours {row['ours_speedup_over_einsum']:.2f}x einsum, {row['ours_speed_over_torch']:.2f}x torch)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
