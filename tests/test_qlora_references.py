"""QLoRA against references that are not our own code: the NF4 table and rounding rule of the
QLoRA paper, the forward pass of LoRA on the same weights dequantized, and `peft` on top of the
exported (dequantized) base of a QLoRA run."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from alpaca_jax.model import Llama
from alpaca_jax.model.quantize import QuantizedArray, dequantize, quantize

# Dettmers et al. 2023, "QLoRA", Appendix E (the NF4 data type), as bitsandbytes ships it.
QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
ALL = ("q", "k", "v", "o", "gate", "up", "down")


def _reference_dequantize(q: QuantizedArray) -> np.ndarray:
    """From the stored bytes, as the paper defines them: level[code] * block absmax (NF4; codes
    two per byte, low nibble first), or code / 127 * absmax (int8)."""
    codes = np.asarray(q.codes)
    if q.format == "nf4":
        nibbles = np.stack([codes & 0xF, codes >> 4], axis=-1).reshape(q.shape)
        unit = np.asarray(QLORA_NF4, np.float64)[nibbles]
    else:
        unit = codes.astype(np.float64) / 127
    scales = np.asarray(q.scales.astype(jnp.float32), np.float64)
    block = q.shape[-1] // scales.shape[-1]
    return unit * np.repeat(scales, block, axis=-1)


@pytest.mark.parametrize("format", ["nf4", "int8"])
def test_codes_are_the_papers_nearest_levels_within_its_error_bound(format):
    w = np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32) * 0.02
    w[3, :64] = 0.0  # an all-zero block
    q = quantize(jnp.asarray(w), format, 64)
    scales = np.repeat(np.asarray(q.scales.astype(jnp.float32), np.float64), 64, axis=-1)
    assert (scales >= np.abs(w)).all()  # a scale never clips its block
    back = _reference_dequantize(q)
    np.testing.assert_allclose(np.asarray(dequantize(q)), back, rtol=0, atol=1e-7)
    unit = w / scales
    if format == "nf4":
        levels = np.asarray(QLORA_NF4)
        nearest = levels[np.argmin(np.abs(unit[..., None] - levels), axis=-1)]
        np.testing.assert_allclose(back / scales, nearest, atol=1e-7)  # round to the nearest level
        bound = np.max(np.diff(levels)) / 2                               # half the widest gap: 0.1519
    else:
        np.testing.assert_array_equal(np.asarray(q.codes), np.round(unit * 127).astype(np.int8))
        bound = 1 / 254
    assert (np.abs(back - w) <= bound * scales + 1e-9).all()
    assert (np.abs(back - w) / scales).max() > 0.5 * bound  # the bound is nearly reached: not vacuous


def test_qlora_run_equals_lora_on_its_dequantized_base_and_peft_on_its_export(tmp_path):
    """A QLoRA run's logits equal (1) plain LoRA on the same weights dequantized by the paper's
    rule, and (2) `peft` with its `export-peft` adapter on its `export-hf` base (written
    dequantized)."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from alpaca_jax import hf
    from alpaca_jax.config import config_from_dict
    from alpaca_jax.train import train
    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(tmp_path / "hf")
    cfg = config_from_dict({}, [
        "model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2",
        "model.num_heads=4", "model.num_kv_heads=2", "model.max_position_embeddings=128",
        f"model.init_from={tmp_path / 'hf'}", f"run.dir={tmp_path / 'run'}", "data.max_len=96",
        "train.batch_size=4", "train.max_steps=1", "optimizer.learning_rate=5e-2", "optimizer.warmup_steps=0",
        "checkpoint.every=1", "train.progress_bar=false", "run.tensorboard=false", "lora.rank=4", "lora.alpha=8",
        "lora.quantize=nf4", "lora.block_size=16", f"lora.target_modules=[{','.join(ALL)}]"])
    result = train(cfg)
    ids = np.random.default_rng(1).integers(0, 512, (2, 20))
    positions = np.broadcast_to(np.arange(20), ids.shape)
    ours = np.asarray(jax.jit(Llama(cfg.model, cfg.lora).apply)(
        {"params": result.base, "lora": result.state.params}, jnp.asarray(ids), jnp.asarray(positions),
        jnp.ones(ids.shape, jnp.int32)))
    base_plain = jax.tree.map(lambda x: jnp.asarray(_reference_dequantize(x), jnp.float32)
                              if isinstance(x, QuantizedArray) else x, result.base,
                              is_leaf=lambda x: isinstance(x, QuantizedArray))
    plain = np.asarray(jax.jit(Llama(cfg.model, dataclasses.replace(cfg.lora, quantize="none")).apply)(
        {"params": base_plain, "lora": result.state.params}, jnp.asarray(ids), jnp.asarray(positions),
        jnp.ones(ids.shape, jnp.int32)))
    np.testing.assert_allclose(ours, plain, rtol=0, atol=2e-5)
    adapter_dir = hf.export_peft(result.run_dir, tmp_path / "adapter")
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4
    base = LlamaForCausalLM.from_pretrained(hf.export_hf(result.run_dir, tmp_path / "base"),
                                            local_files_only=True, dtype=torch.float32)
    # The exported base is the dequantized NF4 base, not the original weights.
    original = LlamaForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True, dtype=torch.float32)
    assert not torch.equal(base.model.layers[0].mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base, adapter_dir).eval()(torch.tensor(ids)).logits.numpy()
    np.testing.assert_array_less(np.abs(ours - theirs).max(), 1e-4)
