"""The pure preference train step: sequence log-probs of packed pairs, reference, loss, update.

A batch is SFT's packed layout with pairs as consecutive segments (data/preference_batches.py):
the per-token log-probs of the targets, masked to the scored answer's tokens, are summed per
segment with a one-hot [B, T, 2S] contraction (S = pair slots per row), which gives every
sequence's log-prob at the cost of one small matmul; segment 2k-1 is the chosen answer of the
row's k-th pair, 2k its rejected one. Padding is segment 0 and falls out of the sum.

The reference's log-probs come from (in this order): the batch (`ref_logps`, precomputed once
before training); `frozen["reference"]`, full weights (a frozen copy of the start, or another
model); or with LoRA `frozen["base"]` alone, i.e. the same base with the adapters switched off,
which costs no memory. They never get a gradient.

The loss is the mean over all pairs of the global batch: each micro-batch's summed loss is
divided by the global pair count before differentiation (train/step.py does the same with tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from alpaca_jax.config import PreferenceConfig
from alpaca_jax.train.preference_loss import pair_losses, pair_metric_sums
from alpaca_jax.train.state import TrainState
from alpaca_jax.train.step import model_variables, token_losses


def segment_sums(values: jax.Array, segment_ids: jax.Array, slots: int) -> jax.Array:
    """[B, T] values summed per segment 1..2*slots -> [B, 2*slots] (segment 0, padding, dropped)."""
    one_hot = jax.nn.one_hot(segment_ids - 1, 2 * slots, dtype=jnp.float32)  # [B, T, 2S]; -1 -> zeros
    return jnp.einsum("bt,bts->bs", values.astype(jnp.float32), one_hot)


def sequence_logps(model, variables, batch, slots: int, rng=None, loss_chunk: int | None = None) -> jax.Array:
    """Summed log-prob of the scored tokens of every segment: [B, 2*slots] (fp32)."""
    nll = token_losses(model, variables, batch, rng, loss_chunk)
    return segment_sums(-nll * batch["loss_mask"], batch["segment_ids"], slots)


def reference_logps(ref_model, frozen: dict, batch, slots: int, loss_chunk: int | None = None) -> jax.Array:
    """The reference's sequence log-probs: precomputed in the batch, or from the frozen weights."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    weights = frozen["reference"] if "reference" in frozen else frozen["base"]
    return jax.lax.stop_gradient(sequence_logps(ref_model, {"params": weights}, batch, slots,
                                                loss_chunk=loss_chunk))


def num_pairs(batch, slots: int) -> jax.Array:
    """Pairs in a batch of any leading shape: chosen segments with a scored token."""
    flat = jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), batch)
    counts = segment_sums(flat["loss_mask"], flat["segment_ids"], slots)
    return jnp.sum(counts[:, 0::2] > 0)


def pair_sums(params, batch, frozen: dict, rng=None, *, model, ref_model, cfg: PreferenceConfig, slots: int,
              loss_chunk: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(summed loss, summed metrics) over the pairs of one [B, T] batch."""
    policy = sequence_logps(model, model_variables(params, frozen.get("base")), batch, slots, rng, loss_chunk)
    ref = reference_logps(ref_model, frozen, batch, slots, loss_chunk)
    counts = segment_sums(batch["loss_mask"], batch["segment_ids"], slots)
    valid = (counts[:, 0::2] > 0).astype(jnp.float32)
    sides = lambda x: (x[:, 0::2], x[:, 1::2])  # noqa: E731  chosen, rejected
    (pc, pr), (rc, rr), (lc, lr) = sides(policy), sides(ref), sides(counts)
    losses = pair_losses(pc, pr, rc, rr, lc, lr, cfg)
    return jnp.sum(losses * valid), pair_metric_sums(pc, pr, rc, rr, valid, cfg.beta)


def preference_loss_and_grads(params, batch, frozen: dict, rng=None, **kwargs):
    """(mean loss over the global batch's pairs, metric means, gradients) for [A, M, T] micro-batches."""
    slots = kwargs["slots"]
    count = jnp.maximum(num_pairs(batch, slots), 1).astype(jnp.float32)
    micro_rng = lambda i: None if rng is None else jax.random.fold_in(rng, i)  # noqa: E731

    def micro(p, mb, i):
        loss, metrics = pair_sums(p, mb, frozen, micro_rng(i), **kwargs)
        return loss / count, jax.tree.map(lambda m: m / count, metrics)

    grad_fn = jax.value_and_grad(micro, has_aux=True)
    if batch["input_ids"].shape[0] == 1:
        (loss, metrics), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch), 0)
        return loss, metrics, grads

    def accumulate(carry, indexed):
        (loss, metrics), grads = grad_fn(params, *indexed)
        total, total_metrics, total_grads = carry
        return (total + loss, jax.tree.map(jnp.add, total_metrics, metrics),
                jax.tree.map(jnp.add, total_grads, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    zero_metrics = jax.eval_shape(lambda: micro(params, jax.tree.map(lambda x: x[0], batch), 0)[1])
    zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics)
    indices = jnp.arange(batch["input_ids"].shape[0])
    (loss, metrics, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zero_metrics, zeros),
                                             (batch, indices))
    return loss, metrics, grads


def preference_train_step(state: TrainState, batch, frozen: dict, *, model, ref_model, cfg: PreferenceConfig,
                          slots: int, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                          seed: int = 0, loss_chunk: int | None = None):
    """One optimizer step on a global batch of [A, M, T] packed pair rows. `frozen`: what is read
    and never trained ({"base"} with LoRA, {"reference"} for full weights, either, or neither)."""
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    loss, metrics, grads = preference_loss_and_grads(state.params, batch, frozen, rng, model=model,
                                                     ref_model=ref_model, cfg=cfg, slots=slots,
                                                     loss_chunk=loss_chunk)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step), "tokens": jnp.sum(batch["segment_ids"] > 0),
               "pairs": num_pairs(batch, slots)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def preference_eval_step(params, batch, frozen: dict, *, model, ref_model, cfg: PreferenceConfig, slots: int,
                         loss_chunk: int | None = None) -> dict[str, jax.Array]:
    """Summed loss, metric sums and pair count of one global batch (no dropout)."""
    flat = jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), batch)
    loss, metrics = pair_sums(params, flat, frozen, model=model, ref_model=ref_model, cfg=cfg, slots=slots,
                              loss_chunk=loss_chunk)
    return {"loss": loss, **metrics, "pairs": num_pairs(flat, slots)}


def reference_step(frozen: dict, batch, *, ref_model, slots: int, loss_chunk: int | None = None) -> jax.Array:
    """The reference's sequence log-probs of one global batch of [A, M, T] rows: [A*M, 2*slots]
    (the precompute pass)."""
    flat = jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), batch)
    return reference_logps(ref_model, frozen, flat, slots, loss_chunk)
