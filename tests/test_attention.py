"""Attention on the accelerator path: the fused Pallas kernels equal `xla` attention on packed
rows (run on CPU through Pallas interpret mode), and `model.attention=auto` picks per platform
and logs every fallback."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alpaca_jax.data.packing import pack_rows
from alpaca_jax.model import Llama, init_params
from alpaca_jax.model import attention
from alpaca_jax.model.attention import AttentionShape, MeshSplit, segment_causal_mask, select_attention
from alpaca_jax.model.fused_attention import pallas_flash_attention, splash_attention
from alpaca_jax.train.step import loss_and_grads
from conftest import REPO
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


def _mesh(data: int, fsdp: int, tensor: int, **rules) -> MeshSplit:
    """A mesh as the choice sees it, split by the default rules (batch over data and fsdp,
    heads and kv heads over tensor) unless `rules` says otherwise."""
    split = dict(batch=("data", "fsdp"), heads=("tensor",), kv_heads=("tensor",), length=())
    split.update(rules)
    return MeshSplit((("data", data), ("fsdp", fsdp), ("tensor", tensor)), **split)


MHA = AttentionShape(head_dim=128, num_heads=32, num_kv_heads=32, batch=8, dtype="bfloat16")
GQA = AttentionShape(head_dim=64, num_heads=32, num_kv_heads=4, batch=8, dtype="bfloat16")
FP32 = dataclasses.replace(MHA, dtype="float32")
ONE, DATA8, FSDP8, MIXED, TENSOR8 = None, _mesh(8, 1, 1), _mesh(1, 8, 1), _mesh(2, 2, 2), _mesh(1, 1, 8)
CUDNN_FIRST = ("cudnn", "pallas_flash")  # a kernel table that measured cuDNN faster

# requested, platform, shape, mesh, kernel table order -> what runs, interpreted, per device
# under shard_map, and the words a warning must have (None: no warning). The why of each row is
# its comment.
SELECTION = [
    # auto keeps the fused kernel on every mesh the shape splits over
    ("auto", "gpu", MHA, ONE, None, "pallas_flash", False, False, None),
    ("auto", "gpu", MHA, DATA8, None, "pallas_flash", False, True, None),
    ("auto", "gpu", GQA, FSDP8, None, "pallas_flash", False, True, None),
    ("auto", "gpu", GQA, MIXED, None, "pallas_flash", False, True, None),   # 4 kv heads over tensor=2
    ("auto", "tpu", MHA, MIXED, None, "splash", False, True, None),
    ("auto", "cpu", GQA, ONE, None, "chunked", False, False, None),         # no fused kernel on CPU
    ("auto", "cpu", GQA, MIXED, None, "chunked", False, False, None),
    # ... and falls back, saying why, only where the shape cannot split
    ("auto", "gpu", GQA, TENSOR8, None, "xla", False, False, "4 kv heads do not divide over mesh axis 'tensor' (size 8)"),
    ("auto", "gpu", dataclasses.replace(MHA, num_heads=12, num_kv_heads=12), _mesh(1, 1, 8), None, "xla", False,
     False, "12 heads do not divide over mesh axis 'tensor'"),
    ("auto", "gpu", dataclasses.replace(MHA, batch=4), DATA8, None, "xla", False, False,
     "4 rows do not divide over mesh axis 'data'x'fsdp' (size 8)"),
    ("auto", "gpu", MHA, _mesh(2, 2, 2, length=("fsdp",)), None, "xla", False, False, "whole sequences"),
    ("auto", "gpu", MHA, _mesh(1, 1, 8, kv_heads=()), None, "xla", False, False, "GQA groups"),
    ("auto", "gpu", MHA, "8 devices, no layout", None, "xla", False, False, "no mesh layout"),
    # the kernel table orders the exact kernels; a kernel the shape does not suit is skipped
    ("auto", "gpu", MHA, ONE, CUDNN_FIRST, "cudnn", False, False, None),
    ("auto", "gpu", MHA, MIXED, CUDNN_FIRST, "cudnn", False, True, None),
    ("auto", "gpu", FP32, ONE, CUDNN_FIRST, "pallas_flash", False, False, None),  # cuDNN: bf16/fp16 only
    ("auto", "gpu", dataclasses.replace(MHA, head_dim=8), ONE, None, "cudnn", False, False, None),  # Triton: >= 16
    ("auto", "gpu", dataclasses.replace(FP32, head_dim=8), ONE, None, "xla", False, False, "16 <= head_dim <= 256"),
    ("auto", "tpu", dataclasses.replace(MHA, head_dim=64), ONE, None, "xla", False, False, "multiple of 128"),
    ("auto", "metal", MHA, ONE, None, "xla", False, False, "no fused kernel"),
    ("auto", "gpu", MHA, ONE, (), "xla", False, False, None),  # measured: no fused kernel beat xla
    # what was asked runs, or a one-line warning names the kernel, platform or mesh axis, fallback
    ("xla", "gpu", MHA, MIXED, None, "xla", False, False, None),
    ("chunked", "tpu", MHA, ONE, None, "chunked", False, False, None),
    ("pallas_flash", "gpu", MHA, MIXED, None, "pallas_flash", False, True, None),
    ("pallas_flash", "cpu", GQA, ONE, None, "pallas_flash", True, False, "interpret mode"),
    ("pallas_flash", "cpu", GQA, MIXED, None, "pallas_flash", True, True, "interpret mode"),
    ("cudnn", "gpu", GQA, FSDP8, None, "cudnn", False, True, None),
    ("splash", "gpu", MHA, ONE, None, "xla", False, False, "model.attention=splash on gpu: it is a tpu kernel"),
    ("cudnn", "cpu", GQA, ONE, None, "chunked", False, False, "model.attention=cudnn on cpu: it is a gpu kernel"),
    ("cudnn", "gpu", FP32, ONE, None, "xla", False, False, "model.attention=cudnn on gpu: cuDNN attention needs bf16"),
    ("pallas_flash", "gpu", dataclasses.replace(MHA, head_dim=512), ONE, None, "xla", False, False, "16 <= head_dim <= 256"),
    ("pallas_flash", "gpu", GQA, TENSOR8, None, "xla", False, False,
     "model.attention=pallas_flash on gpu: 4 kv heads do not divide over mesh axis 'tensor' (size 8)"),
]


@pytest.mark.parametrize("requested,platform,shape,mesh,order,runs,interpret,sharded,warning", SELECTION)
def test_attention_selection(requested, platform, shape, mesh, order, runs, interpret, sharded, warning,
                             caplog, monkeypatch):
    monkeypatch.setattr(attention, "_logged", set())  # the log is deduplicated per process
    monkeypatch.setattr(attention, "kernel_order", lambda platform: order)  # not the shipped table
    devices, split = (8, None) if isinstance(mesh, str) else (1 if mesh is None else mesh.devices, mesh)
    with caplog.at_level(logging.INFO, logger="alpaca_jax"):
        choice = select_attention(requested, platform, shape, devices, split)
    assert (choice.implementation, choice.interpret, choice.sharded) == (runs, interpret, sharded)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warning is None:
        assert not warnings
    else:  # one line, naming the fallback taken
        assert len(warnings) == 1 and warning in warnings[0] and runs in warnings[0], warnings
        assert "\n" not in warnings[0]
    if requested == "auto":  # auto always says what it picked
        assert any(f"attention: {runs}" in r.getMessage() for r in caplog.records)


def test_kernel_table_orders_auto(tmp_path, monkeypatch):
    """`auto` reads the benchmark's kernel table: its exact kernels for the platform, fastest
    first (a kernel of another platform is not taken)."""
    table = tmp_path / "kernel_table.json"
    table.write_text(json.dumps({"gpu": {"device_kind": "NVIDIA H200", "fastest_exact": ["cudnn", "splash", "pallas_flash"]}}))
    monkeypatch.setattr(attention, "KERNEL_TABLE", table)
    assert attention.kernel_order("gpu") == ("cudnn", "pallas_flash")
    assert attention.kernel_order("tpu") is None
    monkeypatch.setattr(attention, "KERNEL_TABLE", tmp_path / "absent.json")
    assert attention.kernel_order("gpu") is None


def test_the_benchmark_writes_the_table_auto_reads(tmp_path, monkeypatch):
    """benchmarks/gpu.py ranks the kernels it measured (exact ones that beat xla at every
    shape, fastest first) and writes the table; `auto` then reads that order back."""
    spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "benchmarks" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    timings = {"a": {"xla": 8.0, "pallas_flash": 4.2, "cudnn": 2.0, "splash": 1.0},
               "b": {"xla": 20.0, "pallas_flash": 5.3, "cudnn": 30.0, "splash": 1.0}}
    # cudnn is slower than xla at shape b; splash was not exact
    assert gpu.fastest_exact(timings, {"pallas_flash": True, "cudnn": True, "splash": False}) == ["pallas_flash"]
    timings["b"]["cudnn"] = 2.5
    order = gpu.fastest_exact(timings, {"pallas_flash": True, "cudnn": True})
    assert order == ["cudnn", "pallas_flash"]
    table = tmp_path / "kernel_table.json"
    gpu.write_kernel_table({"platform": "gpu", "device_kind": "NVIDIA H100", "jax_version": "0", "fwd_bwd_ms": timings,
                            "exact": {"pallas_flash": True, "cudnn": True}, "fastest_exact": order}, table)
    monkeypatch.setattr(attention, "KERNEL_TABLE", table)
    assert attention.kernel_order("gpu") == ("cudnn", "pallas_flash")


def test_auto_attention_on_this_cpu_is_chunked():
    assert jax.default_backend() == "cpu"
    assert select_attention("auto", jax.default_backend(), tiny_model().resolved_head_dim).implementation == "chunked"
