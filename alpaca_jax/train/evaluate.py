"""Held-out loss: the training loss, without gradients, over a whole evaluation set.

The eval set is tokenized, packed and sharded exactly like training batches (the same
`BatchIterator`, one epoch, the same global batch and placement), and each batch returns the
*sum* of its response-token losses and the *count* of those tokens. The mean is taken once,
over the whole set: sum / count is the exact mean response-token loss whatever the batch size,
packing or device count, the same definition as the training loss (train/step.py).

Not here: choosing the held-out rows (data/split.py); the `alpaca-jax eval` command (eval/).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from alpaca_jax.data import BatchIterator
from alpaca_jax.train.step import summed_loss


@dataclasses.dataclass(frozen=True)
class EvalLoss:
    loss: float          # mean -log p over response tokens (response + EOS), nats
    perplexity: float    # exp(loss)
    tokens: int          # response tokens scored
    examples: int        # examples scored


def eval_step(params, batch, base=None, *, model, loss_chunk: int | None = None) -> dict[str, jax.Array]:
    """Summed loss and response-token count of one global batch of [A, M, T] rows (with LoRA,
    `params` are the adapters and `base` the frozen weights; no dropout: no rng). `loss_chunk`
    as in training, so eval never materialises logits that training does not."""
    flat = jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), batch)  # [A*M, T]
    return {"loss_sum": summed_loss(params, model, flat, base, loss_chunk=loss_chunk),
            "loss_tokens": jnp.sum(flat["loss_mask"])}


def eval_batches(input_ids, loss_mask, *, batch_size: int, seq_len: int, pad_id: int,
                 packing: bool, pack_window: int, shard_index: int = 0, shard_count: int = 1) -> list[dict]:
    """The eval set as process-local packed batches (one pass; the order does not matter for a sum)."""
    iterator = BatchIterator(input_ids, loss_mask, batch_size=batch_size, seq_len=seq_len, seed=0,
                             num_epochs=1, pad_id=pad_id, packing=packing, pack_window=pack_window,
                             shard_index=shard_index, shard_count=shard_count)
    return list(iterator)


def mean_eval_loss(step_fn, params, batches, place, examples: int) -> EvalLoss:
    """Run the jitted `eval_step` over `batches` (each placed on the mesh by `place`)."""
    total, tokens = 0.0, 0.0
    sums = [step_fn(params, place(batch)) for batch in batches]  # dispatched before any wait
    for result in jax.device_get(sums):
        total += float(result["loss_sum"])
        tokens += float(result["loss_tokens"])
    loss = total / max(tokens, 1.0)
    return EvalLoss(loss=loss, perplexity=_perplexity(loss), tokens=int(tokens), examples=examples)


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709

