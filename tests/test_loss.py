"""The memory-lean cross-entropy equals the plain one; `train.chunked_loss` decides by size;
the planner counts the loss and attention that will run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alpaca_jax.config import config_from_dict
from alpaca_jax.data.packing import pack_rows
from alpaca_jax.model import Llama, init_params
from alpaca_jax.train.plan import plan_memory
from alpaca_jax.train.loss import (CHUNKED_LOSS_MIN_BYTES, LOSS_CHUNK_TOKENS, chunked_loss_rule,
                                   chunked_token_cross_entropy, token_cross_entropy)
from alpaca_jax.train.step import loss_and_grads
from helpers import random_examples, tiny_model

jax.config.update("jax_default_matmul_precision", "highest")


def _packed_batch(vocab: int):
    """Two rows of 24 tokens (48 in all): packed examples, prompt/response masks, padding."""
    ids, masks = random_examples(np.random.default_rng(7), [9, 4, 12, 6, 8], vocab)
    return {k: jnp.asarray(v)[None] for k, v in pack_rows([[0, 1, 2], [3, 4]], ids, masks, 24, 0).items()}


# chunk of tokens vs the 2 x 24 = 48 tokens: divides them, does not (a ragged last chunk),
# is larger; vocabularies that do (128) and do not (97) divide the chunks.
@pytest.mark.parametrize("chunk,vocab", [(16, 97), (20, 97), (16, 128), (20, 128), (64, 97)])
def test_chunked_cross_entropy_equals_plain(chunk, vocab):
    """Masked sum of token losses, and its gradients in hidden states and head, with
    response masks and padding (segment 0, outside the mask)."""
    keys = jax.random.split(jax.random.key(chunk + vocab), 3)
    hidden = jax.random.normal(keys[0], (2, 24, 32))
    head = jax.random.normal(keys[1], (vocab, 32)) * 0.3
    batch = _packed_batch(vocab)
    targets, mask = batch["targets"][0], batch["loss_mask"][0]
    assert int(jnp.sum(batch["segment_ids"] == 0)) > 0 and 0 < int(jnp.sum(mask)) < 48

    def plain(h, w):
        return jnp.sum(token_cross_entropy(h @ w.T, targets) * mask)

    def chunked(h, w):
        return jnp.sum(chunked_token_cross_entropy(h, w, targets, chunk) * mask)

    value_plain, grads_plain = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))(hidden, head)
    value_chunked, grads_chunked = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, head)
    np.testing.assert_allclose(float(value_chunked), float(value_plain), rtol=1e-6)
    for a, b in zip(grads_chunked, grads_plain):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_model_loss_chunked_equals_plain_with_tied_head():
    """Through the model (`return_hidden=True`; the tied head, whose gradient meets the
    embedding's): the train step's loss and every parameter gradient are the plain loss's.
    (The untied head goes through the bf16 test below.)"""
    cfg = tiny_model(num_layers=1, tie_embeddings=True)
    params = init_params(cfg, jax.random.key(0))
    batch = _packed_batch(cfg.vocab_size)
    step = lambda loss_chunk: jax.jit(lambda p, b: loss_and_grads(p, Llama(cfg), b, loss_chunk=loss_chunk))
    loss_plain, grads_plain = step(None)(params, batch)
    loss_chunked, grads_chunked = step(20)(params, batch)
    np.testing.assert_allclose(float(loss_chunked), float(loss_plain), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_chunked), jax.tree.leaves(grads_plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_chunked_loss_equals_plain_loss_in_bf16():
    """bf16 compute, fp32 master weights: each chunk multiplies in bf16 as the plain head
    does, so the two agree to bf16 rounding of the gradient sums (stated: 1e-3 absolute on
    gradients whose largest entries are ~1e-1)."""
    cfg = tiny_model(num_layers=1, dtype="bfloat16")
    params = init_params(cfg, jax.random.key(1))
    batch = _packed_batch(cfg.vocab_size)
    step = lambda loss_chunk: jax.jit(lambda p, b: loss_and_grads(p, Llama(cfg), b, loss_chunk=loss_chunk))
    loss_plain, grads_plain = step(None)(params, batch)
    loss_chunked, grads_chunked = step(20)(params, batch)
    np.testing.assert_allclose(float(loss_chunked), float(loss_plain), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_chunked), jax.tree.leaves(grads_plain)):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-2, atol=1e-3)


def test_chunked_loss_rule():
    small, large = CHUNKED_LOSS_MIN_BYTES // (4 * 1000), 2 * CHUNKED_LOSS_MIN_BYTES // (4 * 1000)
    assert chunked_loss_rule("auto", small, 1000)[0] is None
    assert chunked_loss_rule("auto", large, 1000)[0] == LOSS_CHUNK_TOKENS
    assert chunked_loss_rule("always", 8, 1000)[0] == LOSS_CHUNK_TOKENS
    assert chunked_loss_rule("never", 10 * large, 1000)[0] is None
    assert "MiB" in chunked_loss_rule("auto", large, 1000)[1]


def test_planner_counts_the_chunked_loss():
    """The planner's logits term follows the rule: the LLaMA-3 vocabulary's logits shrink from
    the whole micro-batch's to one chunk's when the loss is chunked."""
    base = {"model": {"preset": "llama3-8b"}, "data": {"max_len": 2048},
            "train": {"batch_size": 8}, "mesh": {"data": 1, "fsdp": 1}}
    plans = {mode: plan_memory(config_from_dict(base, [f"train.chunked_loss={mode}"]), 1)
             for mode in ("never", "always", "auto")}
    tokens, vocab = 8 * 2048, 128256
    saved = 2 * (tokens - LOSS_CHUNK_TOKENS) * vocab * 4
    assert plans["never"].activations - plans["always"].activations == pytest.approx(saved, abs=8)
    assert plans["auto"].activations == plans["always"].activations


def test_planner_drops_attention_scores_under_a_fused_kernel():
    """Planned for a GPU, `auto` attention is the fused kernel, which never writes the
    [N, T, T] scores and probabilities the planner counts for xla attention on CPU."""
    cfg = config_from_dict({"model": {"preset": "llama-7b", "num_layers": 2}, "data": {"max_len": 2048},
                            "train": {"batch_size": 1}, "mesh": {"data": 1, "fsdp": 1}})
    on_gpu, with_xla = plan_memory(cfg, 1, "gpu"), plan_memory(cfg, 1, "cpu")
    scores = 2 * 2 * 32 * 2048 * 2048 * 4  # layers x (scores + probabilities) x heads x T x T x fp32
    assert with_xla.activations - on_gpu.activations == scores
