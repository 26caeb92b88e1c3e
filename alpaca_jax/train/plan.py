"""Memory planner: per-device bytes of a config on a mesh, before launching anything.

Parameters, gradients and optimizer state are exact: they come from the same abstract shapes,
logical axes, rules and optax state that training uses (`jax.eval_shape`, no allocation).
Activations are an estimate of what the backward pass keeps, per remat policy:

- none / save_dots: every block keeps its norm inputs, q/k/v, the attention output, the
  attention scores and probabilities, and the SwiGLU gate/up/product (per device: batch rows
  divided by data*fsdp, heads and mlp by tensor);
- minimal: the same without the attention score tensors (they are recomputed);
- a fused attention kernel (what `model.attention` runs on the planned platform, by default the
  one JAX sees here) never writes scores, under any policy;
- full: only each block's input, plus one block's full set while it is recomputed;
plus fp32 logits and their gradient for one micro-batch, or for one chunk of tokens when the
chunked loss runs (`train.chunked_loss`, decided by the same rule as training), and, for a
quantized LoRA base, one layer's weights dequantized in the compute dtype. What a block keeps
is then scaled, under mixed precision (compute narrower than fp32), by what XLA was measured
to keep beyond those named tensors on the platform (`KEPT_OVER_NAMED`: the fp32 intermediates
of the norms, rotary embeddings, softmax and SwiGLU that its fusion leaves live); with fp32
compute those intermediates are the named tensors themselves. With LoRA,
"parameters", gradients and optimizer state are the adapters', and the frozen base is counted
apart. XLA's scheduling, fusion and
temporary buffers move real peaks by tens of percent; treat the verdict as a guide.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from alpaca_jax import sharding
from alpaca_jax.config import Config
from alpaca_jax.configlib import parse_bytes  # noqa: F401  (re-exported: it lived here first)
from alpaca_jax.model.attention import FUSED_KERNELS, AttentionShape, select_attention
from alpaca_jax.model.layers import DTYPES
from alpaca_jax.model.params import logical_axes, param_shapes
from alpaca_jax.train import adapters
from alpaca_jax.train.loss import run_loss_chunk
from alpaca_jax.train.optim import learning_rate_schedule, make_optimizer
from alpaca_jax.train.state import optimizer_state_layout

@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    devices: int
    mesh: dict[str, int]
    params: int        # bytes per device
    grads: int
    optimizer: int
    activations: int   # estimate, see module docstring
    micro_batch_rows: int  # rows per device per micro-batch
    frozen: int = 0        # bytes per device of a LoRA run's frozen base (0: full fine-tuning)
    trainable_params: int = 0  # weights the optimizer updates (all of them, or the adapters)
    total_params: int = 0      # every weight of the model, adapters included

    @property
    def total(self) -> int:
        return self.frozen + self.params + self.grads + self.optimizer + self.activations


def _tree_bytes(specs, shapes, axis_sizes) -> int:
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    total = 0
    for spec, shape in zip(spec_leaves, jax.tree.leaves(shapes)):
        total += math.prod(sharding.shard_shape(shape.shape, spec, axis_sizes)) * np.dtype(shape.dtype).itemsize
    return total


# Bytes XLA keeps per block over the named tensors counted below, by platform, with bf16/fp16
# compute. Measured, not derived: cpu from XLA's own buffer assignment of the train step
# (`memory_analysis()`, the quick shapes of benchmarks/accelerator.py at 1 to 3 layers: 2.9x
# to 3.1x; with fp32 compute benchmarks/lora.py measured the plain estimate within 5%); gpu fit
# to the peak device memory of the H200 run in benchmarks/results/accelerator_gpu.json (both
# shapes, Pallas flash attention: 2.8x and 2.5x; 2.6 puts both within 5%), which
# benchmarks/gpu.sh re-checks (`peak_over_planner`). TPU is unmeasured (1.0).
KEPT_OVER_NAMED = {"cpu": 3.0, "gpu": 2.6}


def _activation_bytes(cfg: Config, rows: int, axis_sizes: dict[str, int], platform: str) -> int:
    m = cfg.model
    size = np.dtype(DTYPES[m.dtype]).itemsize
    tensor = axis_sizes["tensor"]
    t, length, h = rows * cfg.data.max_len, cfg.data.max_len, m.resolved_head_dim
    heads, kv, mlp = m.num_heads / tensor, m.num_kv_heads / tensor, m.intermediate_size / tensor
    scores = 2 * rows * heads * length * length * size           # scores + probabilities
    split = sharding.attention_split(axis_sizes, cfg.mesh.rules)
    shape = AttentionShape(h, m.num_heads, m.num_kv_heads, rows * split.size(split.batch), m.dtype)
    if select_attention(m.attention, platform, shape, split.devices, split).implementation in FUSED_KERNELS:
        scores = 0
    dense = t * (4 * m.hidden_size + (2 * heads + 2 * kv) * h + 3 * mlp) * size
    kept = KEPT_OVER_NAMED.get(platform, 1.0) if size < 4 else 1.0
    per_block = {"none": kept * (dense + scores), "save_dots": kept * (dense + scores), "minimal": kept * dense,
                 "full": t * m.hidden_size * size}[m.remat]
    recompute = kept * (dense + scores) if m.remat == "full" else 0  # one block live again in backward
    loss_chunk, _ = run_loss_chunk(cfg, axis_sizes)
    logit_tokens = t if loss_chunk is None else min(t, loss_chunk)
    logits = 2 * logit_tokens * m.vocab_size / tensor * 4         # fp32 logits and their gradient
    dequantized = 0
    if cfg.lora is not None and cfg.lora.quantize != "none":     # one layer's weights, gathered
        q, kv = m.num_heads * h, m.num_kv_heads * h
        dequantized = m.hidden_size * (2 * q + 2 * kv + 3 * m.intermediate_size) / tensor * size
    return int(m.num_layers * per_block + recompute + logits + dequantized)


def plan_memory(cfg: Config, num_devices: int, platform: str | None = None) -> MemoryPlan:
    """Per-device bytes of `cfg` over `num_devices`, on `platform` (default: JAX's here)."""
    sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(cfg.mesh, num_devices)))
    shapes, specs = adapters.trainable_layout(cfg)
    param_specs = sharding.mesh_specs(specs, shapes, sizes, cfg.mesh.rules)
    params = _tree_bytes(param_specs, shapes, sizes)
    optimizer = make_optimizer(cfg.optimizer, learning_rate_schedule(cfg.optimizer, 1), specs)
    opt_shapes = jax.eval_shape(optimizer.init, shapes)
    opt_specs = optimizer_state_layout(optimizer, opt_shapes, param_specs, jax.sharding.PartitionSpec(),
                                       is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    opt_bytes = _tree_bytes(opt_specs, opt_shapes, sizes)
    rows = sharding.check_batch_divides(cfg.train.batch_size, cfg.train.grad_accum, sizes, cfg.mesh.rules)
    frozen, total_params = 0, adapters.count(shapes)
    if cfg.lora is not None:
        base, base_specs = adapters.base_shapes(cfg.model, cfg.lora), adapters.base_axes(cfg.model, cfg.lora)
        frozen = _tree_bytes(sharding.mesh_specs(base_specs, base, sizes, cfg.mesh.rules), base, sizes)
        total_params += adapters.count(param_shapes(cfg.model))
    return MemoryPlan(devices=num_devices, mesh=sizes, params=params, grads=params,
                      optimizer=opt_bytes, activations=_activation_bytes(cfg, rows, sizes, platform or jax.default_backend()),
                      micro_batch_rows=rows, frozen=frozen, trainable_params=adapters.count(shapes),
                      total_params=total_params)


def parameter_report(plan: MemoryPlan) -> str:
    """One line for the run log: trainable vs total weights, and the bytes per device of each part."""
    mib = lambda b: f"{b / 2**20:.2f} MiB"
    return (f"parameters: {plan.trainable_params:,} trainable of {plan.total_params:,} "
            f"({100 * plan.trainable_params / max(plan.total_params, 1):.3g}%); per device: frozen base "
            f"{mib(plan.frozen)}, trainable {mib(plan.params)}, gradients {mib(plan.grads)}, "
            f"optimizer state {mib(plan.optimizer)}")


def format_plan(plan: MemoryPlan, cfg: Config, device_memory: int | None) -> str:
    gib = lambda b: f"{b / 2**30:10.2f} GiB"
    lines = [
        f"model: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
        f"params {cfg.model.param_dtype}, compute {cfg.model.dtype}, remat {cfg.model.remat}",
        f"mesh: {plan.mesh} over {plan.devices} devices; {plan.micro_batch_rows} rows x "
        f"{cfg.data.max_len} tokens per device per micro-batch",
        f"parameters: {plan.trainable_params:,} trainable of {plan.total_params:,} "
        f"({100 * plan.trainable_params / max(plan.total_params, 1):.3g}%)",
        "per device:",
        *([f"  frozen base       {gib(plan.frozen)}   ({cfg.lora.quantize if cfg.lora.quantize != 'none' else cfg.lora.base_dtype or cfg.model.param_dtype})"]
          if cfg.lora is not None else []),
        f"  {'adapters' if cfg.lora is not None else 'parameters':<17} {gib(plan.params)}",
        f"  gradients         {gib(plan.grads)}",
        f"  optimizer state   {gib(plan.optimizer)}",
        f"  activations (est) {gib(plan.activations)}",
        f"  total             {gib(plan.total)}",
    ]
    if device_memory is not None:
        verdict = "fits" if plan.total <= device_memory else "does NOT fit"
        lines.append(f"{verdict} in {device_memory / 2**30:.2f} GiB per device "
                     f"({100 * plan.total / device_memory:.0f}% used)")
    return "\n".join(lines)
