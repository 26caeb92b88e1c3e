"""The optimizer: AdamW with linear warmup then cosine/linear decay, and global-norm clipping."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then decay to `min_lr_ratio * peak` at `total_steps`.

    Warmup length is `warmup_steps`, else `ceil(warmup_ratio * total_steps)` as HF Trainer.
    """
    peak = opt_cfg.learning_rate
    if opt_cfg.warmup_steps is not None:
        warmup = opt_cfg.warmup_steps
    else:
        warmup = int(-(-opt_cfg.warmup_ratio * total_steps // 1))
    warmup = min(warmup, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = peak * opt_cfg.min_lr_ratio
    if opt_cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt_cfg.min_lr_ratio)
    elif opt_cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(logical_specs):
    """Weight decay on matrices and embeddings, not on norm scales (as HF Trainer excludes
    LayerNorm weights). Decided by the logical 'norm' axis, so it survives layer stacking."""
    return jax.tree.map(lambda spec: "norm" not in tuple(spec), logical_specs,
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def make_optimizer(opt_cfg, schedule: optax.Schedule, logical_specs) -> optax.GradientTransformation:
    parts = []
    if opt_cfg.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(opt_cfg.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                             weight_decay=opt_cfg.weight_decay, mask=decay_mask(logical_specs)))
    return optax.chain(*parts)
