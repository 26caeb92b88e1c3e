"""Preference tuning (DPO): loss, TRL's reward metrics and gradients against TRL's own
DPOTrainer (PyTorch CPU, fp32) on the same tiny LLaMA and pairs; packed = unpacked; LoRA's free
reference (adapters off) = an explicit frozen copy; a tiny run that learns a synthetic preference;
the pair layouts; bad pairs counted and skipped."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alpaca_jax import hf
from alpaca_jax.config import LoraConfig, PreferenceConfig, load_config
from alpaca_jax.data.chat import chat_template
from alpaca_jax.data.preference import pairs_from_rows
from alpaca_jax.data.preference_batches import PairBatchIterator, PairStats, TokenizedPairs, tokenize_pairs
from alpaca_jax.data.tokenizer import train_bpe_tokenizer
from alpaca_jax.model import Llama
from alpaca_jax.model.params import init_adapters
from alpaca_jax.train.adapters import prepare_base
from alpaca_jax.train.preference_step import num_pairs, pair_sums
from helpers import tiny_model

VOCAB = 64
HF_SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
PAD = 0


def _pairs(seed: int = 0, n: int = 5) -> list[dict]:
    """Random token pairs of different prompt and answer lengths (ids 3.. ; 1 = BOS, 2 = EOS)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = [1] + rng.integers(3, VOCAB, rng.integers(2, 9)).tolist()
        chosen = rng.integers(3, VOCAB, rng.integers(1, 7)).tolist() + [2]
        rejected = rng.integers(3, VOCAB, rng.integers(1, 7)).tolist() + [2]
        out.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return out


def _tokenized(pairs: list[dict]) -> TokenizedPairs:
    def side(key):
        ids = [np.asarray(p["prompt_ids"] + p[key], np.int32) for p in pairs]
        masks = [np.asarray([0] * len(p["prompt_ids"]) + [1] * len(p[key]), bool) for p in pairs]
        return ids, masks
    (ci, cm), (ri, rm) = side("chosen_ids"), side("rejected_ids")
    return TokenizedPairs(ci, cm, ri, rm, PairStats(len(pairs), len(pairs), 0, 0, 0, 0))


def _batch(pairs: list[dict], packing: bool, rows: int) -> tuple[dict, int]:
    it = PairBatchIterator(_tokenized(pairs), batch_size=rows, seq_len=160, seed=0, num_epochs=1, pad_id=PAD,
                           packing=packing)
    assert it.steps_in_epoch(0) == 1
    return {k: jnp.asarray(v) for k, v in next(it).items()}, it.slots


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """A policy and a different reference, as HF directories (so both sides read the same weights)."""
    root = tmp_path_factory.mktemp("dpo_models")
    dirs = {}
    for name, seed in (("policy", 0), ("reference", 1)):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**HF_SHAPE))
        with torch.no_grad():  # a trained-like spread, so log-ratios are far from 0
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def _ours(hf_models, pairs, loss: str, packing: bool = True, rows: int = 1):
    cfg = tiny_model(vocab_size=VOCAB, max_position_embeddings=128)
    policy = hf.load_hf_params(hf_models["policy"], cfg)
    reference = hf.load_hf_params(hf_models["reference"], cfg)
    batch, slots = _batch(pairs, packing, rows)
    model = Llama(cfg)
    pref = PreferenceConfig(beta=0.1, loss=loss)
    count = num_pairs(batch, slots)

    def mean_loss(params):
        loss_sum, metrics = pair_sums(params, batch, {"reference": reference}, model=model, ref_model=model,
                                      cfg=pref, slots=slots)
        return loss_sum / count, jax.tree.map(lambda m: m / count, metrics)

    (value, metrics), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(policy)
    return float(value), {k: float(v) for k, v in metrics.items()}, grads, cfg


def _trl(hf_models, pairs, loss: str, tmp_path: Path):
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer
    policy = LlamaForCausalLM.from_pretrained(hf_models["policy"], dtype=torch.float32)
    reference = LlamaForCausalLM.from_pretrained(hf_models["reference"], dtype=torch.float32)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=[loss], report_to="none", use_cpu=True,
                     per_device_train_batch_size=len(pairs), max_length=None,
                     bf16=False)  # TRL defaults to bf16 autocast (its reference model runs under it): fp32 here
    # The trainer needs a dataset to start; the batch it scores is collated from our token ids.
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    trainer.model.train()
    value = trainer.compute_loss(trainer.model, trainer.data_collator(pairs))
    value.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads_model = copy.deepcopy(policy)
    with torch.no_grad():
        for (name, p), (_, g) in zip(grads_model.named_parameters(), policy.named_parameters()):
            p.copy_(g.grad)
    grads_model.save_pretrained(tmp_path / "trl_grads")
    return float(value), metrics, tmp_path / "trl_grads"


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_loss_metrics_and_gradients_equal_trl_dpo_trainer(hf_models, tmp_path, loss):
    pairs = _pairs()
    value, metrics, grads, cfg = _ours(hf_models, pairs, loss)
    trl_value, trl_metrics, trl_grads_dir = _trl(hf_models, pairs, loss, tmp_path)
    np.testing.assert_allclose(value, trl_value, rtol=1e-5)
    for name in METRICS:
        np.testing.assert_allclose(metrics[name], trl_metrics[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert 0 < trl_metrics["rewards/accuracies"] < 1  # both outcomes occur: the comparison can fail
    trl_grads = hf.load_hf_params(trl_grads_dir, cfg)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(trl_grads))
    for path, ours in jax.tree_util.tree_leaves_with_path(grads):
        theirs = trl_grads
        for key in path:
            theirs = theirs[key.key]
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_packed_pairs_equal_unpacked(hf_models):
    pairs = _pairs(seed=3, n=6)
    packed = _ours(hf_models, pairs, "sigmoid", packing=True, rows=2)
    unpacked = _ours(hf_models, pairs, "sigmoid", packing=False, rows=6)
    np.testing.assert_allclose(packed[0], unpacked[0], rtol=1e-5)
    for name in METRICS:
        np.testing.assert_allclose(packed[1][name], unpacked[1][name], rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(packed[2]), jax.tree.leaves(unpacked[2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_lora_reference_with_adapters_off_equals_an_explicit_frozen_copy(hf_models):
    cfg = tiny_model(vocab_size=VOCAB, max_position_embeddings=128)
    lora = LoraConfig(rank=4, target_modules=("q", "v", "up"))
    weights = hf.load_hf_params(hf_models["policy"], cfg)
    base = prepare_base(weights, cfg, lora)
    adapters = init_adapters(cfg, lora, jax.random.key(0))
    # B = 0 at init would make policy = reference: move it so the adapters matter.
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * jax.random.normal(jax.random.key(len(str(p))), x.shape), adapters)
    copy_of_base = hf.load_hf_params(hf_models["policy"], cfg)  # read again: a separate frozen model
    batch, slots = _batch(_pairs(seed=5), True, 1)
    kwargs = dict(model=Llama(cfg, lora), ref_model=Llama(cfg), cfg=PreferenceConfig(beta=0.1), slots=slots)

    def run(frozen):
        return jax.value_and_grad(lambda a: pair_sums(a, batch, frozen, **kwargs), has_aux=True)(adapters)

    (free, free_metrics), free_grads = run({"base": base})
    (explicit, explicit_metrics), explicit_grads = run({"base": base, "reference": copy_of_base})
    assert abs(float(free_metrics["rewards/margins"])) > 1e-3  # the adapters moved the policy
    np.testing.assert_allclose(float(free), float(explicit), rtol=1e-6)
    for name in METRICS:
        np.testing.assert_allclose(float(free_metrics[name]), float(explicit_metrics[name]), rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(free_grads), jax.tree.leaves(explicit_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
