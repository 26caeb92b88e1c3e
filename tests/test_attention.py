"""Attention on the accelerator path: the fused Pallas kernels equal `xla` attention on packed
rows (run on CPU through Pallas interpret mode), and `model.attention=auto` picks per platform
and logs every fallback."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alpaca_jax.data.packing import pack_rows
from alpaca_jax.model import Llama, init_params
from alpaca_jax.model import attention
from alpaca_jax.model.attention import segment_causal_mask, select_attention
from alpaca_jax.model.fused_attention import pallas_flash_attention, splash_attention
from alpaca_jax.train.step import loss_and_grads
from helpers import random_examples, tiny_model

jax.config.update("jax_default_matmul_precision", "highest")

KERNELS = {"pallas_flash": pallas_flash_attention, "splash": splash_attention}
# Stated tolerances, against xla attention on the same inputs. fp32: both sides accumulate in
# fp32, differing only in summation order. bf16: the kernels round the probabilities to bf16
# before the second matmul at different points than XLA; 3e-2 is ~8 bf16 ulps at |x| ~ 1.
TOLERANCE = {"float32": dict(rtol=1e-5, atol=2e-5), "bfloat16": dict(rtol=3e-2, atol=3e-2)}


def _packed_qkv(dtype):
    """One row of length 100 (not a multiple of the kernels' 128 blocks) packing three examples
    and padding, GQA 4:2 heads."""
    b, t, n, k, h = 1, 100, 4, 2, 32
    keys = jax.random.split(jax.random.key(0), 4)
    query = jax.random.normal(keys[0], (b, t, n, h)).astype(dtype)
    key = jax.random.normal(keys[1], (b, t, k, h)).astype(dtype)
    value = jax.random.normal(keys[2], (b, t, k, h)).astype(dtype)
    cotangent = jax.random.normal(keys[3], (b, t, n, h)).astype(dtype)
    segments = jnp.asarray([[1] * 30 + [2] * 45 + [3] * 15 + [0] * 10], jnp.int32)
    return query, key, value, cotangent, segments


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_fused_kernel_equals_xla_attention(kernel, dtype):
    """Values and gradients (q, k, v) of each fused kernel equal jax.nn.dot_product_attention's
    with the segment-causal mask: packed segments, padding, GQA, fp32 and bf16."""
    query, key, value, cotangent, segments = _packed_qkv(jnp.dtype(dtype))
    mask = segment_causal_mask(segments)

    def reference(q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out

    def fused(q, k, v):
        out = KERNELS[kernel](q, k, v, segments, interpret=True)
        return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out

    value_and_grads = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
    (_, out_ref), grads_ref = value_and_grads(reference)(query, key, value)
    (_, out), grads = value_and_grads(fused)(query, key, value)
    assert out.dtype == query.dtype and out.shape == query.shape
    as32 = lambda x: np.asarray(x, np.float32)
    np.testing.assert_allclose(as32(out), as32(out_ref), **TOLERANCE[dtype])
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == g_ref.dtype
        np.testing.assert_allclose(as32(g), as32(g_ref), **TOLERANCE[dtype])


# Splash through the whole model costs twice the GPU kernel's interpreter time; its kernel test
# above checks the same values and gradients, so the suite's budget goes to one kernel here.
@pytest.mark.parametrize("implementation", ["pallas_flash"])
def test_model_with_fused_kernel_equals_xla_model_on_packed_rows(implementation):
    """The wiring, end to end: the model with `model.attention=<kernel>` (interpreted on CPU)
    gives the `xla` model's loss and gradients on a packed batch. As the xla model's packed
    loss equals its unpacked one (test_model.py), so does the kernel's."""
    fused, xla = tiny_model(attention=implementation, num_layers=1), tiny_model(attention="xla", num_layers=1)
    params = init_params(xla, jax.random.key(3))
    ids, masks = random_examples(np.random.default_rng(1), [9, 4, 12, 6, 8], xla.vocab_size)
    packed = {k: jnp.asarray(v)[None] for k, v in pack_rows([[0, 1, 2], [3, 4]], ids, masks, 24, 0).items()}
    # jitted: interpret mode run op by op in eager mode is several times slower
    loss_f, grads_f = jax.jit(lambda p, b: loss_and_grads(p, Llama(fused), b))(params, packed)
    loss_x, grads_x = jax.jit(lambda p, b: loss_and_grads(p, Llama(xla), b))(params, packed)
    np.testing.assert_allclose(float(loss_f), float(loss_x), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_f), jax.tree.leaves(grads_x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# requested, platform, head_dim, devices -> what runs, whether interpreted, a warning's words
SELECTION = [
    ("auto", "cpu", 32, 1, "chunked", False, None),
    ("auto", "gpu", 128, 1, "pallas_flash", False, None),
    ("auto", "tpu", 128, 1, "splash", False, None),
    ("auto", "tpu", 64, 1, "xla", False, "multiple of 128"),
    ("auto", "gpu", 8, 1, "xla", False, "16 <= head_dim <= 256"),
    ("auto", "metal", 128, 1, "xla", False, "no fused kernel"),
    ("auto", "gpu", 128, 8, "xla", False, "mesh of 8 devices"),
    ("xla", "gpu", 128, 1, "xla", False, None),
    ("chunked", "tpu", 128, 1, "chunked", False, None),
    ("pallas_flash", "cpu", 32, 1, "pallas_flash", True, "interpret mode"),
    ("splash", "gpu", 128, 1, "xla", False, "is a tpu kernel"),
    ("pallas_flash", "gpu", 512, 1, "xla", False, "16 <= head_dim <= 256"),
    ("pallas_flash", "gpu", 128, 8, "pallas_flash", False, "not partitioned"),
]


@pytest.mark.parametrize("requested,platform,head_dim,devices,runs,interpret,warning", SELECTION)
def test_attention_selection(requested, platform, head_dim, devices, runs, interpret, warning, caplog,
                             monkeypatch):
    monkeypatch.setattr(attention, "_logged", set())  # the log is deduplicated per process
    with caplog.at_level(logging.INFO, logger="alpaca_jax"):
        choice = select_attention(requested, platform, head_dim, devices)
    assert (choice.implementation, choice.interpret) == (runs, interpret)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warning is None:
        assert not warnings
    else:
        assert len(warnings) == 1 and warning in warnings[0] and runs in warnings[0]
    if requested == "auto":  # auto always says what it picked
        assert any(f"attention: {runs}" in r.getMessage() for r in caplog.records)


def test_auto_attention_on_this_cpu_is_chunked():
    assert jax.default_backend() == "cpu"
    assert select_attention("auto", jax.default_backend(), tiny_model().resolved_head_dim).implementation == "chunked"
