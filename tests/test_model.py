"""The Flax LLaMA: published parameter counts, causality, packing equivalence, numerics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alpaca_jax.config import RopeScalingConfig
from alpaca_jax.data.packing import pack_rows
from alpaca_jax.model import Llama, count_params, init_params, logical_axes, model_preset, preset_names
from alpaca_jax.model.attention import chunked_causal_attention, segment_causal_mask
from alpaca_jax.model.layers import dense
from alpaca_jax.model.rope import rope_inverse_frequencies
from alpaca_jax.train.step import loss_and_grads
from helpers import random_examples, tiny_model

jax.config.update("jax_default_matmul_precision", "highest")

PUBLISHED = {  # parameter counts of the released checkpoints
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_matches_published(name):
    assert count_params(model_preset(name)) == PUBLISHED[name]


def test_every_preset_has_a_count_and_axis_names():
    for name in preset_names():
        cfg = model_preset(name)
        specs = jax.tree.leaves(logical_axes(cfg), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        assert specs and all(all(isinstance(a, str) for a in spec) for spec in specs), name


def test_tied_embeddings_drop_the_output_head():
    untied, tied = tiny_model(), tiny_model(tie_embeddings=True)
    assert count_params(untied) - count_params(tied) == untied.vocab_size * untied.hidden_size


def _logits(cfg, params, ids, positions=None, segments=None):
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t)) if positions is None else positions
    segments = jnp.ones((b, t), jnp.int32) if segments is None else segments
    return Llama(cfg).apply({"params": params}, ids, positions, segments)


@pytest.mark.parametrize("scan", [True, False])
def test_future_tokens_do_not_change_earlier_logits(scan):
    cfg = tiny_model(scan_layers=scan)
    params = init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    changed = ids.at[:, 7].set((ids[:, 7] + 1) % cfg.vocab_size)
    before, after = _logits(cfg, params, ids), _logits(cfg, params, changed)
    np.testing.assert_array_equal(np.asarray(before[:, :7]), np.asarray(after[:, :7]))
    assert not np.allclose(np.asarray(before[:, 7:]), np.asarray(after[:, 7:]))


def test_packed_row_equals_each_example_alone():
    """Logits of an example inside a packed row equal its logits run by itself."""
    cfg = tiny_model()
    params = init_params(cfg, jax.random.key(0))
    ids, masks = random_examples(np.random.default_rng(0), [7, 5, 9], cfg.vocab_size)
    packed = pack_rows([[0, 1, 2]], ids, masks, seq_len=24, pad_id=0)
    logits = _logits(cfg, params, packed["input_ids"], packed["positions"], packed["segment_ids"])
    start = 0
    for example in ids:
        n = len(example) - 1
        alone = _logits(cfg, params, jnp.asarray(example[None, :-1]))
        np.testing.assert_allclose(np.asarray(logits[0, start:start + n]), np.asarray(alone[0]),
                                   rtol=1e-5, atol=1e-5)
        start += n


def test_packed_batch_loss_and_grads_equal_unpacked():
    cfg = tiny_model()
    params = init_params(cfg, jax.random.key(3))
    ids, masks = random_examples(np.random.default_rng(1), [9, 4, 12, 6, 8], cfg.vocab_size)
    packed = pack_rows([[0, 1, 2], [3, 4]], ids, masks, seq_len=24, pad_id=0)
    unpacked = pack_rows([[i] for i in range(5)], ids, masks, seq_len=12, pad_id=0)
    as_micro = lambda b: {k: jnp.asarray(v)[None] for k, v in b.items()}
    loss_p, grads_p = loss_and_grads(params, Llama(cfg), as_micro(packed))
    loss_u, grads_u = loss_and_grads(params, Llama(cfg), as_micro(unpacked))
    np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-6)
    for gp, gu in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_u)):
        np.testing.assert_allclose(np.asarray(gp), np.asarray(gu), rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_equals_one_big_batch():
    cfg = tiny_model()
    params = init_params(cfg, jax.random.key(4))
    ids, masks = random_examples(np.random.default_rng(2), [9, 4, 12, 6], cfg.vocab_size)
    batch = {k: jnp.asarray(v) for k, v in pack_rows([[0], [1], [2], [3]], ids, masks, 12, 0).items()}
    one = {k: v[None] for k, v in batch.items()}                       # [1, 4, T]
    two = {k: v.reshape(2, 2, *v.shape[1:]) for k, v in batch.items()}  # [2, 2, T]
    loss1, grads1 = loss_and_grads(params, Llama(cfg), one)
    loss2, grads2 = loss_and_grads(params, Llama(cfg), two)
    np.testing.assert_allclose(float(loss1), float(loss2), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_fp32_params_with_bf16_compute():
    cfg32 = tiny_model()
    cfg16 = tiny_model(dtype="bfloat16")
    params = init_params(cfg32, jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    ids = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg32.vocab_size)
    l32, l16 = _logits(cfg32, params, ids), _logits(cfg16, params, ids)
    assert l16.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(l16, np.float32)))  # its error budget: test_hf's bf16 test
    batch = {k: jnp.asarray(v)[None] for k, v in pack_rows(
        [[0]], *random_examples(np.random.default_rng(0), [10], cfg16.vocab_size), 12, 0).items()}
    loss, grads = loss_and_grads(params, Llama(cfg16), batch)
    assert np.isfinite(float(loss))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))  # grads follow the params


def test_bf16_params_are_stored_in_bf16():
    params = init_params(tiny_model(param_dtype="bfloat16", dtype="bfloat16"), jax.random.key(0))
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = RopeScalingConfig(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192)
    hf_cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                         rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inverse_frequencies(128, 500000.0, scaling)
    np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6)
    plain = rope_inverse_frequencies(128, 500000.0)
    assert not np.allclose(ours, plain)  # the scaling really changed the low frequencies


@pytest.mark.parametrize("x_shape, kernel_shape, num_in", [
    ((2, 3, 4), (4, 5), 1),          # [B, T, D] x [D, F]
    ((2, 3, 4), (4, 2, 3), 1),       # [B, T, D] x [D, N, H]: a projection to heads
    ((2, 3, 2, 3), (2, 3, 4), 2),    # [B, T, N, H] x [N, H, D]: the output projection
])
def test_dense_is_the_einsum_it_replaces(x_shape, kernel_shape, num_in):
    """`dense` (one 2-D matmul) equals the einsum over the trailing dims, values and gradients."""
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], x_shape)
    kernel = jax.random.normal(keys[1], kernel_shape)
    letters = "abcdefgh"
    lead, contracted = letters[:x.ndim - num_in], letters[x.ndim - num_in:x.ndim]
    out = "pqr"[:kernel.ndim - num_in]
    spec = f"{lead}{contracted},{contracted}{out}->{lead}{out}"
    np.testing.assert_allclose(dense(x, kernel, num_in), jnp.einsum(spec, x, kernel), rtol=1e-6, atol=1e-6)
    grads = jax.grad(lambda a, b: jnp.sum(jnp.sin(dense(a, b, num_in))), argnums=(0, 1))(x, kernel)
    grads_ref = jax.grad(lambda a, b: jnp.sum(jnp.sin(jnp.einsum(spec, a, b))), argnums=(0, 1))(x, kernel)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [4, 8, 64])  # ragged last block, exact blocks, a single block
def test_chunked_attention_matches_dot_product_attention(chunk):
    """Causal query blocks give jax.nn.dot_product_attention's values and gradients (GQA, packed
    segments, padding), so `model.attention=chunked` is the same function."""
    b, t, n, k, h = 2, 24, 4, 2, 8
    keys = jax.random.split(jax.random.key(0), 4)
    query = jax.random.normal(keys[0], (b, t, n, h))
    key = jax.random.normal(keys[1], (b, t, k, h))
    value = jax.random.normal(keys[2], (b, t, k, h))
    cotangent = jax.random.normal(keys[3], (b, t, n, h))
    segments = jnp.asarray([[1] * 5 + [2] * 11 + [3] * 4 + [0] * 4, [1] * 24], jnp.int32)

    def reference(q, k_, v):
        return jnp.sum(jax.nn.dot_product_attention(q, k_, v, mask=segment_causal_mask(segments)) * cotangent)

    def chunked(q, k_, v):
        return jnp.sum(chunked_causal_attention(q, k_, v, segments, chunk=chunk) * cotangent)

    out_ref = jax.nn.dot_product_attention(query, key, value, mask=segment_causal_mask(segments))
    out = chunked_causal_attention(query, key, value, segments, chunk=chunk)
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_ref), rtol=1e-5, atol=1e-6)
    grads_ref = jax.grad(reference, argnums=(0, 1, 2))(query, key, value)
    grads = jax.grad(chunked, argnums=(0, 1, 2))(query, key, value)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-5)


def test_chunked_attention_model_equals_xla_model(monkeypatch):
    """End to end: same params, same packed batch -> same loss and gradients either way."""
    monkeypatch.setattr("alpaca_jax.model.attention.QUERY_CHUNK", 8)  # several blocks at T=24
    xla, chunked = tiny_model(), tiny_model(attention="chunked")
    params = init_params(xla, jax.random.key(5))
    ids, masks = random_examples(np.random.default_rng(3), [9, 4, 12, 6, 8], xla.vocab_size)
    batch = {k: jnp.asarray(v)[None] for k, v in pack_rows([[0, 1, 2], [3, 4]], ids, masks, 24, 0).items()}
    loss_x, grads_x = loss_and_grads(params, Llama(xla), batch)
    loss_c, grads_c = loss_and_grads(params, Llama(chunked), batch)
    np.testing.assert_allclose(float(loss_c), float(loss_x), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
