"""The token cross-entropy of the output head, plain or chunked over tokens.

The plain loss takes [B, T, V] logits and upcasts them to fp32: with LLaMA-3's 128K vocabulary
that is the largest tensor of the step (8 x 4096 x 128,256 x 4 bytes = 16.8 GB, and as much
again for its gradient). The chunked loss takes the final hidden states and the head weight
instead (`Llama.apply(..., return_hidden=True)`) and computes the logits of `LOSS_CHUNK_TOKENS`
tokens at a time under `jax.checkpoint`: the backward pass recomputes each chunk's logits
rather than keeping them, so at most one chunk's [C, V] fp32 logits (and gradient) is live.
The price is one extra head matmul in the backward pass. Same values and gradients as the plain
loss (tests/test_loss.py).

`chunked_loss_rule` decides, per run, whether chunking is worth that price (`train.chunked_loss`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alpaca_jax.config import Config

LOSS_CHUNK_TOKENS = 1024             # tokens per chunk: [1024, 32000] fp32 logits are 131 MB
CHUNKED_LOSS_MIN_BYTES = 64 * 2**20  # auto chunks when one micro-batch's fp32 logits exceed this


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position -log p(target), computed in fp32: [B, T, V], [B, T] -> [B, T]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit


def chunked_token_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                                chunk: int = LOSS_CHUNK_TOKENS) -> jax.Array:
    """token_cross_entropy(hidden @ head.T, targets) without the [B, T, V] logits:
    [B, T, D] hidden, [V, D] head, [B, T] targets -> [B, T] losses (fp32)."""
    batch, length, embed = hidden.shape
    tokens = batch * length
    num_chunks = -(-tokens // chunk)
    pad = num_chunks * chunk - tokens  # padded tokens' losses are computed, then dropped
    flat_hidden = jnp.pad(hidden.reshape(tokens, embed), ((0, pad), (0, 0)))
    flat_targets = jnp.pad(targets.reshape(tokens), (0, pad))
    # The head enters the scan in fp32 so its gradient, summed over chunks, is summed in fp32;
    # each chunk still multiplies in the compute dtype, as the plain head does.
    head32 = head.astype(jnp.float32)

    @jax.checkpoint  # keep only the chunk's inputs; recompute its logits in the backward pass
    def chunk_losses(inputs):
        chunk_hidden, chunk_targets = inputs                       # [C, D], [C]
        logits = chunk_hidden @ head32.astype(hidden.dtype).T      # [C, V]
        return token_cross_entropy(logits, chunk_targets)

    losses = jax.lax.map(chunk_losses, (flat_hidden.reshape(num_chunks, chunk, embed),
                                        flat_targets.reshape(num_chunks, chunk)))
    return losses.reshape(-1)[:tokens].reshape(batch, length)


def chunked_loss_rule(mode: str, tokens_per_device: int, vocab_per_device: int) -> tuple[int | None, str]:
    """(chunk size or None for the plain loss, why) for `train.chunked_loss` = auto | always | never.

    `tokens_per_device` is one device's micro-batch (rows x length); `vocab_per_device` the
    head's vocabulary slice on it. Auto chunks once the plain loss's fp32 logits would exceed
    CHUNKED_LOSS_MIN_BYTES: below that they are small beside the activations, and the extra
    head matmul is not worth paying (the tiny CPU recipe is such a case).
    """
    logits_bytes = tokens_per_device * vocab_per_device * 4
    size = f"fp32 logits of {logits_bytes / 2**20:.0f} MiB per device per micro-batch"
    if mode == "never" or (mode == "auto" and logits_bytes <= CHUNKED_LOSS_MIN_BYTES):
        return None, f"plain loss ({mode}: {size})"
    if mode not in ("auto", "always"):
        raise ValueError(f"unknown train.chunked_loss {mode!r}")
    return LOSS_CHUNK_TOKENS, f"chunked over {LOSS_CHUNK_TOKENS} tokens ({mode}: instead of {size})"


def run_loss_chunk(cfg: Config, axis_sizes: dict[str, int]) -> tuple[int | None, str]:
    """`chunked_loss_rule` for a run config on a mesh of these axis sizes (training and the
    planner both ask here, so the plan counts the loss that will run)."""
    rows = cfg.train.batch_size // cfg.train.grad_accum // (axis_sizes["data"] * axis_sizes["fsdp"])
    vocab = -(-cfg.model.vocab_size // axis_sizes["tensor"])
    return chunked_loss_rule(cfg.train.chunked_loss, max(rows, 1) * cfg.data.max_len, vocab)
