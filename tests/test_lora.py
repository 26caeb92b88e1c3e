"""LoRA and QLoRA: exact start, a frozen base, PEFT parity through real `peft` + `transformers`
(PyTorch CPU, fp32), merged export, quantization error bounds, exact resume, a falling QLoRA
loss, the planner's figures, and bad input in one line. The 8-device FSDP check is in
test_sharding.py (it needs its own process)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from alpaca_jax import hf, sharding
from alpaca_jax.checkpoint import restore_params, truncate_metrics
from alpaca_jax.config import LoraConfig, config_from_dict, load_config
from alpaca_jax.model import Llama, param_shapes
from alpaca_jax.model.params import init_adapters
from alpaca_jax.model.quantize import NF4_LEVELS, dequantize, max_error, quantize
from alpaca_jax.train.plan import plan_memory
from alpaca_jax.train import read_metrics, train
from alpaca_jax.train.adapters import base_shardings, frozen_base, initial_adapters, prepare_base
from conftest import REPO
from helpers import tiny_model

ALL_TARGETS = "[q,k,v,o,gate,up,down]"
HF_SHAPE = dict(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
MODEL_OVERRIDES = ["model.vocab_size=1024", "model.hidden_size=32", "model.intermediate_size=64",
                   "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
                   "model.max_position_embeddings=256"]
QUIET = ["train.progress_bar=false", "run.tensorboard=false", "train.log_every=1"]


def _ids(vocab: int, shape=(2, 20), seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape)


def _logits(model_cfg, lora, variables, ids: np.ndarray) -> np.ndarray:
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    out = jax.jit(Llama(model_cfg, lora).apply)(variables, jnp.asarray(ids), jnp.asarray(positions),
                                                jnp.ones(ids.shape, jnp.int32))
    return np.asarray(out)


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


# -- the model -------------------------------------------------------------------------------

@pytest.mark.parametrize("scan,base_dtype", [(True, "float32"), (False, "bfloat16")])
def test_lora_logits_at_init_equal_the_base_models_exactly(scan, base_dtype):
    cfg = tiny_model(scan_layers=scan)
    lora = LoraConfig(rank=4, target_modules=("q", "k", "v", "o", "gate", "up", "down"),
                      dropout=0.1, base_dtype=base_dtype)
    rng = np.random.default_rng(0)  # random weights straight from numpy: no init to compile
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.1, param_shapes(cfg))
    base = prepare_base(params, cfg, lora)
    adapters = jax.jit(lambda key: init_adapters(cfg, lora, key))(jax.random.key(1))
    assert all(float(jnp.abs(a).max()) > 0 for name, a in _named(adapters) if name.endswith("lora_a"))
    ids = _ids(cfg.vocab_size)
    plain = _logits(cfg, None, {"params": base}, ids)
    adapted = _logits(cfg, lora, {"params": base, "lora": adapters}, ids)
    np.testing.assert_array_equal(adapted, plain)


def _named(tree):
    return [(jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_leaves_with_path(tree)]


# -- quantization ----------------------------------------------------------------------------

@pytest.mark.parametrize("format", ["int8", "nf4"])
def test_quantize_round_trip_is_within_the_formats_error(format):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 512)).astype(np.float32) * 0.02
    w[3, 64:128] = 0.0                      # an all-zero block
    w[5, 7] = 0.5                           # an outlier dominates its block only
    q = quantize(jnp.asarray(w), format, 64)
    back = np.asarray(dequantize(q))
    blocks = np.abs(back - w).reshape(8, 8, 64).max(-1)
    assert (blocks <= np.asarray(max_error(format, q.scales)) * (1 + 1e-6)).all()
    assert np.all(back[3, 64:128] == 0)
    assert q.scales.dtype == jnp.bfloat16 and (np.asarray(q.scales, np.float32) >= np.abs(w).reshape(8, 8, 64).max(-1)).all()
    if format == "nf4":
        assert q.codes.dtype == jnp.uint8 and q.codes.shape == (8, 256)   # two codes per byte
        unit = back.reshape(8, 8, 64) / np.asarray(q.scales, np.float32)[..., None]
        assert np.isin(np.round(unit, 5), np.round(NF4_LEVELS, 5)).all()
        # NF4 spends its levels where normal weights are: on N(0, 1) data its mean error is
        # below that of 15 evenly spaced levels with the same absmax scale.
        g = rng.standard_normal((64, 64)).astype(np.float32)
        absmax = np.abs(g).max(-1, keepdims=True)
        evenly = np.abs(np.round(g / absmax * 7) / 7 * absmax - g).mean()
        assert np.abs(np.asarray(dequantize(quantize(jnp.asarray(g), "nf4", 64))) - g).mean() < 0.85 * evenly
    else:
        assert q.codes.dtype == jnp.int8 and q.codes.shape == w.shape


# -- a LoRA run from a HF base (module-scoped: one training run feeds most tests) --------------

@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lora_base") / "hf"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**HF_SHAPE)).save_pretrained(path)  # no tokenizer: the run trains a BPE
    return path


def _lora_cfg(run_dir: Path, hf_dir: Path, *extra: str):
    return config_from_dict({}, MODEL_OVERRIDES + QUIET + [
        f"model.init_from={hf_dir}", f"run.dir={run_dir}", "data.max_len=128", "data.train_on_inputs=true",
        "train.batch_size=4", "train.max_steps=4", "optimizer.learning_rate=2e-2", "optimizer.warmup_steps=0",
        "checkpoint.every=2", "checkpoint.keep=null", "lora.rank=4", "lora.alpha=8", "lora.dropout=0.1",
        f"lora.target_modules={ALL_TARGETS}", *extra])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, hf_base):
    root = tmp_path_factory.mktemp("lora_run")
    cfg = _lora_cfg(root / "run", hf_base)
    return cfg, train(cfg)


def test_after_training_only_the_adapters_changed(lora_run, hf_base):
    cfg, result = lora_run
    mesh = sharding.make_mesh(cfg.mesh)
    fresh_base = frozen_base(cfg, base_shardings(cfg.model, cfg.lora, mesh, cfg.mesh.rules))
    for (name, trained), (_, fresh) in zip(_named(result.base), _named(fresh_base)):
        np.testing.assert_array_equal(np.asarray(trained), np.asarray(fresh), err_msg=name)
    start = initial_adapters(cfg, jax.tree.map(lambda x: x.sharding, result.state.params))
    for (name, trained), (_, initial) in zip(_named(result.state.params), _named(start)):
        assert not np.array_equal(np.asarray(trained), np.asarray(initial)), name
    # The state holds adapters and their Adam moments only: nothing the size of the base.
    base_leaves = {tuple(x.shape) for x in jax.tree.leaves(result.base)}
    assert not base_leaves & {tuple(x.shape) for x in jax.tree.leaves(result.state)}
    records = read_metrics(result.run_dir)  # data.train_on_inputs: every real token is in the loss
    assert all(r["loss_tokens_seen"] == r["tokens_seen"] for r in records)


def test_peft_adapter_on_the_hf_base_and_the_merged_export_match_our_logits(lora_run, hf_base, tmp_path):
    from peft import PeftModel
    cfg, result = lora_run
    ours = _logits(cfg.model, cfg.lora, {"params": result.base, "lora": result.state.params},
                   _ids(cfg.model.vocab_size))
    plain = _logits(cfg.model, None, {"params": result.base}, _ids(cfg.model.vocab_size))
    assert np.abs(ours - plain).max() > 1e-2  # the adapters moved the model: a meaningful comparison

    adapter_dir = hf.export_peft(result.run_dir, tmp_path / "adapter")
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4
    for base_dir in (hf_base, hf.export_hf(result.run_dir, tmp_path / "exported_base")):
        base = LlamaForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
        theirs = _hf_logits(peft_model, _ids(cfg.model.vocab_size))
        np.testing.assert_array_less(np.abs(ours - theirs).max(), 1e-4)

    merged_dir = hf.export_hf(result.run_dir, tmp_path / "merged", merge=True)
    merged = LlamaForCausalLM.from_pretrained(merged_dir, local_files_only=True, dtype=torch.float32).eval()
    np.testing.assert_array_less(np.abs(ours - _hf_logits(merged, _ids(cfg.model.vocab_size))).max(), 1e-4)


def test_resume_repeats_the_uninterrupted_lora_run(lora_run, tmp_path):
    cfg, result = lora_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(result.run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "4")   # as if killed after step 2's checkpoint
    truncate_metrics(resumed_dir, 2)
    train(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(resumed_dir))))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rs]
    assert strip(read_metrics(resumed_dir)) == strip(read_metrics(result.run_dir))
    # A checkpoint holds what changes: the adapters (its params item) and their optimizer state.
    saved = restore_params(resumed_dir / "checkpoints" / "4" / "params")
    assert {name.split("_lora_")[-1] for name, _ in _named(saved)} == {"a']", "b']"}


def test_lora_init_from_a_peft_directory_continues_the_adapter(lora_run, hf_base, tmp_path):
    cfg, result = lora_run
    adapter_dir = hf.export_peft(result.run_dir, tmp_path / "adapter")
    again = _lora_cfg(tmp_path / "again", hf_base, f"lora.init_from={adapter_dir}")
    loaded = initial_adapters(again, jax.tree.map(lambda x: x.sharding, result.state.params))
    for (name, a), (_, b) in zip(_named(loaded), _named(result.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_planner_counts_the_real_lora_arrays(lora_run):
    cfg, result = lora_run
    plan = plan_memory(cfg, 1)
    assert plan.frozen == sum(x.nbytes for x in jax.tree.leaves(result.base))
    assert plan.params == plan.grads == sum(x.nbytes for x in jax.tree.leaves(result.state.params))
    assert plan.optimizer == sum(x.nbytes for x in jax.tree.leaves(result.state.opt_state))
    assert plan.trainable_params == sum(x.size for x in jax.tree.leaves(result.state.params))
    assert plan.total_params == plan.trainable_params + sum(x.size for x in jax.tree.leaves(result.base))


def test_the_7b_recipes_meet_their_memory_targets():
    lora = plan_memory(load_config(REPO / "configs" / "alpaca_lora_7b.yaml"), 1)
    qlora = plan_memory(load_config(REPO / "configs" / "qlora_7b.yaml"), 1)
    full_one = plan_memory(load_config(REPO / "configs" / "alpaca_7b.yaml", ["mesh.fsdp=1", "train.grad_accum=32"]), 1)
    trainable = lambda p: p.params + p.grads + p.optimizer
    assert lora.trainable_params == 4_194_304 and lora.total_params == 6_742_609_920   # Alpaca-LoRA's printout
    assert trainable(lora) < 0.02 * trainable(full_one)
    assert qlora.frozen <= 0.3 * lora.frozen                                        # NF4 vs the bf16 base
    assert lora.total < 24e9 and qlora.total < 24e9 < full_one.total   # one 24 GB GPU


def test_qlora_loss_falls_on_the_tiny_config(tmp_path, caplog):
    cfg = load_config(None, QUIET + [f"run.dir={tmp_path / 'qlora'}", "train.max_steps=24", "train.log_every=8",
                                     "data.max_len=128", "lora.quantize=nf4", "lora.block_size=32", "lora.rank=8",
                                     f"lora.target_modules={ALL_TARGETS}", "optimizer.learning_rate=1e-2",
                                     "checkpoint.every=null"])
    with caplog.at_level("INFO", logger="alpaca_jax"):
        result = train(cfg)
    # The run log reports trainable vs total weights and the bytes of each part per device.
    assert "parameters: 74,752 trainable of 1,337,472" in caplog.text and "frozen base 2.40 MiB" in caplog.text
    codes = result.base["layers_0"]["mlp"]["w_up"].codes
    assert codes.dtype == jnp.uint8 and codes.shape == (128, 352 // 2)
    # A random frozen output head caps how far adapters alone can move the logits (7.7 -> ~7.5
    # here); a pretrained base falls further. The fall is still many times the batch noise.
    assert result.last_loss < result.first_loss - 0.15, (result.first_loss, result.last_loss)


# -- bad input: one line naming it, exit 2 -----------------------------------------------------

def _bad_adapter(lora_run, tmp_path) -> Path:
    cfg, result = lora_run
    adapter = hf.export_peft(result.run_dir, tmp_path / "bad_adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 48)
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    return adapter


@pytest.mark.parametrize("overrides,message", [
    (["lora.target_modules=[q,qkv]"], "config key 'lora.target_modules': unknown target module 'qkv'"),
    (["lora.rank=20"], "lora.rank (20) is larger than a dimension of target module 'k' (32 x 16)"),
    (["lora.init_from=BAD"], "tensor 'base_model.model.model.layers.1.mlp.up_proj.lora_A.weight' has shape "
                             "[4, 48], the model needs [4, 32]"),
])
def test_bad_lora_input_is_one_line_naming_it(lora_run, hf_base, tmp_path, capsys, overrides, message):
    from alpaca_jax.cli import main
    if any("BAD" in o for o in overrides):
        overrides = [o.replace("BAD", str(_bad_adapter(lora_run, tmp_path))) for o in overrides]
    args = ["train", *MODEL_OVERRIDES, *QUIET, f"model.init_from={hf_base}", f"run.dir={tmp_path / 'run'}",
            "data.max_len=128", "train.batch_size=4", f"lora.target_modules={ALL_TARGETS}", "lora.rank=4",
            "lora.alpha=8", *overrides]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err[-2000:]
