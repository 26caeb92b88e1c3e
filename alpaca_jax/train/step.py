"""The pure train step and the supervised loss.

Loss: the mean cross-entropy over all response tokens of the *global* batch (every micro-batch
of every device), i.e. sum(token losses) / count(response tokens). Long responses therefore
weigh more than short ones, and the value does not depend on how the batch is split into
micro-batches or devices. (HF Trainer, which Alpaca used, averages per micro-batch and then
across micro-batches, so its loss shifts with the split; ours is split-invariant, which is what
lets packed and unpacked runs, and 1 vs 8 devices, agree exactly.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from alpaca_jax.model.lora import COLLECTION as LORA_COLLECTION
from alpaca_jax.train.loss import chunked_token_cross_entropy, token_cross_entropy
from alpaca_jax.train.state import TrainState

__all__ = ["summed_loss", "token_losses", "loss_and_grads", "train_step", "token_cross_entropy"]


def model_variables(params, base=None) -> dict:
    """What `model.apply` reads: the params, or (LoRA) the frozen base and the trained adapters."""
    return {"params": params} if base is None else {"params": base, LORA_COLLECTION: params}


def summed_loss(params, model, batch, base=None, rng=None, loss_chunk: int | None = None) -> jax.Array:
    """Sum of response-token losses of one [B, T] batch (not yet divided by the count).

    `base`: the frozen LoRA base when `params` are adapters; `rng`: the adapters' dropout key;
    `loss_chunk` tokens at a time through the memory-lean loss, or None for the plain one.
    """
    losses = token_losses(model, model_variables(params, base), batch, rng, loss_chunk)
    return jnp.sum(losses * batch["loss_mask"])


def token_losses(model, variables, batch, rng=None, loss_chunk: int | None = None) -> jax.Array:
    """[B, T] cross-entropy of every target token (masking is the caller's), through the plain
    loss or, with `loss_chunk`, the memory-lean chunked one; `rng` is the dropout key."""
    rngs = {} if rng is None else {"dropout": rng}
    inputs = (batch["input_ids"], batch["positions"], batch["segment_ids"])
    if loss_chunk is None:
        return token_cross_entropy(model.apply(variables, *inputs, rngs=rngs), batch["targets"])
    hidden, head = model.apply(variables, *inputs, return_hidden=True, rngs=rngs)
    return chunked_token_cross_entropy(hidden, head, batch["targets"], loss_chunk)


def loss_and_grads(params, model, batch, base=None, rng=None, loss_chunk: int | None = None):
    """Mean response-token loss and its gradient over a batch of [A, M, T] micro-batches.

    Each micro-batch's summed loss is divided by the global token count before
    differentiation, so accumulated gradients are exactly those of the global mean.
    Gradients are taken with respect to `params` only (with LoRA: the adapters, never `base`).
    """
    num_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    micro_rng = lambda i: None if rng is None else jax.random.fold_in(rng, i)
    grad_fn = jax.value_and_grad(
        lambda p, mb, i: summed_loss(p, model, mb, base, micro_rng(i), loss_chunk) / num_tokens)
    if batch["input_ids"].shape[0] == 1:  # no accumulation: skip the scan
        return grad_fn(params, jax.tree.map(lambda x: x[0], batch), 0)

    def accumulate(carry, indexed_micro_batch):
        loss, grads = carry
        micro_loss, micro_grads = grad_fn(params, *indexed_micro_batch)
        return (loss + micro_loss, jax.tree.map(jnp.add, grads, micro_grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    indices = jnp.arange(batch["input_ids"].shape[0])
    (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), (batch, indices))
    return loss, grads


def train_step(state: TrainState, batch, base=None, *, model, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, seed: int = 0,
               loss_chunk: int | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch of [A, M, T] arrays (A = accumulation steps).

    With LoRA, `state.params` are the adapters and `base` the frozen weights (read, never
    returned). Dropout keys derive from (seed, step, micro-batch), so a resumed run draws the
    same masks as an uninterrupted one. `loss_chunk`: tokens per chunk of the memory-lean
    cross-entropy, None for the plain one (`alpaca_jax.train.loss.run_loss_chunk` decides).
    """
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    loss, grads = loss_and_grads(state.params, model, batch, base, rng, loss_chunk)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        "tokens": jnp.sum(batch["segment_ids"] > 0),
        "loss_tokens": jnp.sum(batch["loss_mask"]),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics
