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


def _batch(pairs: list[dict], packing: bool, rows: int, reference=None) -> tuple[dict, int]:
    it = PairBatchIterator(_tokenized(pairs), batch_size=rows, seq_len=160, seed=0, num_epochs=1, pad_id=PAD,
                           packing=packing, reference=reference)
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


def _hf_reference_logps(hf_models, pairs, which: str = "reference") -> np.ndarray:
    """[N, 2] summed answer log-probs under one HF model, one sequence at a time."""
    model = LlamaForCausalLM.from_pretrained(hf_models[which], dtype=torch.float32).eval()
    out = np.zeros((len(pairs), 2), np.float32)
    for i, p in enumerate(pairs):
        for k, key in enumerate(("chosen_ids", "rejected_ids")):
            ids = torch.tensor([p["prompt_ids"] + p[key]])
            with torch.no_grad():
                logps = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            out[i, k] = logps[torch.arange(ids.shape[1] - 1), ids[0, 1:]][-len(p[key]):].sum().item()
    return out


def _ours(hf_models, pairs, loss: str, packing: bool = True, rows: int = 1, reference=None,
          label_smoothing: float = 0.0):
    cfg = tiny_model(vocab_size=VOCAB, max_position_embeddings=128)
    policy = hf.load_hf_params(hf_models["policy"], cfg)
    frozen = {} if reference is not None else {"reference": hf.load_hf_params(hf_models["reference"], cfg)}
    batch, slots = _batch(pairs, packing, rows, reference)
    model = Llama(cfg)
    pref = PreferenceConfig(beta=0.1, loss=loss, label_smoothing=label_smoothing)
    count = num_pairs(batch, slots)

    def mean_loss(params):
        loss_sum, metrics = pair_sums(params, batch, frozen, model=model, ref_model=model,
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


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_loss_metrics_and_gradients_equal_trl_dpo_trainer(hf_models, tmp_path, loss):
    """sigmoid = DPO, ipo, hinge (SLiC's): TRL's DPOTrainer computes each on the same batch."""
    pairs = _pairs()
    value, metrics, grads, cfg = _ours(hf_models, pairs, loss)
    trl_value, trl_metrics, trl_grads_dir = _trl(hf_models, pairs, loss, tmp_path)
    np.testing.assert_allclose(value, trl_value, rtol=1e-5)
    for name in METRICS:
        np.testing.assert_allclose(metrics[name], trl_metrics[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert 0 < trl_metrics["rewards/accuracies"] < 1  # both outcomes occur: the comparison can fail
    if loss == "sigmoid":  # precomputed reference log-probs (from HF's reference, scored here) give the same
        precomputed = _ours(hf_models, pairs, loss, reference=_hf_reference_logps(hf_models, pairs))
        np.testing.assert_allclose(precomputed[0], trl_value, rtol=1e-5)
        for name in METRICS:
            np.testing.assert_allclose(precomputed[1][name], trl_metrics[name], rtol=1e-5, atol=1e-7, err_msg=name)
    trl_grads = hf.load_hf_params(trl_grads_dir, cfg)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(trl_grads))
    for path, ours in jax.tree_util.tree_leaves_with_path(grads):
        theirs = trl_grads
        for key in path:
            theirs = theirs[key.key]
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_label_smoothing_is_conservative_dpo_from_its_formula(hf_models):
    """label_smoothing=eps is conservative DPO (Mitchell, "A note on DPO with noisy preferences",
    2023): loss = -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d), d the chosen-minus-
    rejected log-ratio margin. (TRL 1.x no longer applies label_smoothing to `sigmoid`, so the
    reference here is that formula on log-probs scored by the HF models, one sequence at a time.)"""
    pairs = _pairs()
    policy, reference = (_hf_reference_logps(hf_models, pairs, which) for which in ("policy", "reference"))
    margin = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    log_sigmoid = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    for eps in (0.0, 0.1, 0.3):
        expected = np.mean(-(1 - eps) * log_sigmoid(0.1 * margin) - eps * log_sigmoid(-0.1 * margin))
        np.testing.assert_allclose(_ours(hf_models, pairs, "sigmoid", label_smoothing=eps)[0], expected, rtol=1e-5,
                                   err_msg=f"label_smoothing={eps}")


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

    both = jax.jit(lambda b, c: (run({"base": b}), run({"base": b, "reference": c})))  # one compile
    ((free, free_metrics), free_grads), ((explicit, explicit_metrics), explicit_grads) = both(base, copy_of_base)
    assert abs(float(free_metrics["rewards/margins"])) > 1e-3  # the adapters moved the policy
    np.testing.assert_allclose(float(free), float(explicit), rtol=1e-6)
    for name in METRICS:
        np.testing.assert_allclose(float(free_metrics[name]), float(explicit_metrics[name]), rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(free_grads), jax.tree.leaves(explicit_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)


# -- a tiny run on a synthetic preference ---------------------------------------------------------

WORDS = ["red", "blue", "green", "apple", "river", "stone", "cloud", "music", "paper", "light", "tiger", "happy",
         "quiet", "ocean", "bread", "snow"]


def _rule_pairs(rng: np.random.Generator, n: int, avoid: set = frozenset()) -> list[dict]:
    """The rule: the answer lists the prompt's words in order, lowercase; the rejected answer
    shouts them in reverse."""
    out = []
    while len(out) < n:
        a, b, c = rng.choice(WORDS, 3, replace=False).tolist()
        if (a, b, c) in avoid:
            continue
        out.append({"prompt": f"List three words about {a}, {b} and {c}.", "chosen": f"{a}, {b}, {c}.",
                    "rejected": f"{c.upper()}! {b.upper()}! {a.upper()}!"})
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_tiny_run_learns_a_synthetic_preference(tmp_path):
    from alpaca_jax.train import read_metrics, train
    rng = np.random.default_rng(0)
    train_rows = _rule_pairs(rng, 96)
    seen = {tuple(r["chosen"].rstrip(".").split(", ")) for r in train_rows}
    eval_rows = _rule_pairs(rng, 24, avoid=seen)  # prompts never trained on
    cfg = load_config(None, [
        f"data.train_files=[{_write_jsonl(tmp_path / 'train.jsonl', train_rows)}]",
        f"data.eval_files=[{_write_jsonl(tmp_path / 'eval.jsonl', eval_rows)}]",
        "preference.beta=0.1", "preference.precompute_reference=true", "data.max_len=96",
        "train.max_steps=12", "train.batch_size=4", "optimizer.learning_rate=1e-3", "model.vocab_size=512",
        "model.hidden_size=64", "model.intermediate_size=176", "model.num_layers=2",
        "train.progress_bar=false", "run.tensorboard=false", "train.log_every=4", "checkpoint.every=null",
        f"run.dir={tmp_path / 'run'}"])
    result = train(cfg)
    records = read_metrics(result.run_dir)
    for name in ("loss", *METRICS):
        assert all(name in r for r in records) and f"eval_{name}" in records[-1]
    assert records[0]["rewards/accuracies"] < 0.9  # it starts not knowing the rule
    assert records[-1]["eval_rewards/accuracies"] >= 0.9
    assert records[-1]["eval_rewards/margins"] > 0
    assert records[-1]["eval_pairs"] == len(eval_rows)


def test_a_preference_run_resumed_from_a_checkpoint_repeats_every_metric_bitwise(tmp_path, caplog):
    """Six steps with checkpoints at 3 and 6; the step-6 checkpoint removed, the same command
    resumes at step 3 (the pair iterator, counters and precomputed references restored) and ends
    with the same metrics.jsonl and weights as the uninterrupted run."""
    import shutil

    from alpaca_jax.train import read_metrics, train
    rows = _rule_pairs(np.random.default_rng(1), 24)
    cfg = load_config(None, [
        f"data.train_files=[{_write_jsonl(tmp_path / 'train.jsonl', rows)}]", "data.eval_fraction=0.2",
        "preference.precompute_reference=true", "data.max_len=64", "train.max_steps=6", "train.batch_size=2",
        "optimizer.learning_rate=1e-3", "model.vocab_size=384", "model.hidden_size=32",
        "model.intermediate_size=64", "model.num_layers=1", "train.progress_bar=false", "run.tensorboard=false",
        "train.log_every=2", "checkpoint.every=3", "checkpoint.keep=2", f"run.dir={tmp_path / 'run'}"])
    first = train(cfg)
    records = read_metrics(first.run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 6]
    shutil.rmtree(first.run_dir / "checkpoints" / "6")
    with caplog.at_level("INFO", logger="alpaca_jax"):
        resumed = train(cfg)
    assert f"resumed from checkpoint {first.run_dir / 'checkpoints' / '3'} (step 3 of 6)" in caplog.text
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rs]  # noqa: E731
    assert strip(read_metrics(first.run_dir)) == strip(records)  # floats compared exactly
    for a, b in zip(jax.tree.leaves(first.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- layouts and bad pairs ----------------------------------------------------------------------

LAYOUTS = [
    ({"prompt": "Name a color.", "chosen": "Blue.", "rejected": "No."}, [("user", "Name a color.")]),
    ({"instruction": "Add them.", "input": "2 and 3", "chosen": "5", "rejected": "6"}, [("user", "Add them.")]),
    ({"prompt": "Hi?", "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
      "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}]},
     [("user", "Hi?")]),
    ({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
      "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": [{"role": "assistant", "content": "Bye."}]},
     [("system", "Be brief."), ("user", "Hi?")]),
    ({"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant: A pear.",
      "rejected": "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant: Rocks."},
     [("user", "Hi?"), ("assistant", "Hello."), ("user", "Name a fruit.")]),
]


def test_every_pair_layout_reads_its_prompt_and_scores_only_the_last_answer():
    rows = [(f"f:{i}", row) for i, (row, _) in enumerate(LAYOUTS)]
    pairs, report = pairs_from_rows(rows)
    assert not report.malformed and len(pairs) == len(LAYOUTS)
    for pair, (row, turns) in zip(pairs, LAYOUTS):
        assert [(t.role, t.content) for t in pair.prompt.turns] == turns
    assert pairs[1].prompt.turns[0].input == "2 and 3"
    assert (pairs[4].chosen, pairs[4].rejected) == ("A pear.", "Rocks.")
    texts = ["USER: Hi? ASSISTANT: Hello. A pear. Rocks. Blue. No. 5 6 Go away. Bye."] * 20
    tokenizer = train_bpe_tokenizer(texts, 300, 1)
    template = chat_template("vicuna_v1.1", tokenizer)
    tok = tokenize_pairs(pairs, tokenizer, template, max_len=512)
    assert tok.stats.kept == len(LAYOUTS)
    eos = tokenizer.eos_token
    for ids, mask, pair in zip(tok.chosen_ids, tok.chosen_mask, pairs):  # the HH pair has an earlier answer
        assert tokenizer.decode(ids[mask]).strip() == pair.chosen + eos
    for ids, mask, pair in zip(tok.rejected_ids, tok.rejected_mask, pairs):
        assert tokenizer.decode(ids[mask]).strip() == pair.rejected + eos


BAD = [{"prompt": "Name a color.", "chosen": "Blue."},                                  # no rejected
       {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Blue."},             # chosen == rejected
       {"prompt": "word " * 400, "chosen": "Blue.", "rejected": "Red."},                # prompt fills max_len
       {"prompt": "Name a color.", "chosen": "Green.", "rejected": "Red."}]             # fine


def test_bad_pairs_are_counted_and_skipped_or_refused_in_one_line(tmp_path):
    from alpaca_jax.data.preference import read_pairs
    from alpaca_jax.data.records import DataError
    path = _write_jsonl(tmp_path / "bad.jsonl", BAD)
    pairs, report = read_pairs(path)
    assert dict(report.malformed) == {"no 'rejected'": 1, "chosen equals rejected": 1}
    assert report.malformed_where[0].startswith(f"{path}:1")
    tokenizer = train_bpe_tokenizer(["word Blue. Red. Green. Name a color."] * 20, 300, 1)
    tok = tokenize_pairs(pairs, tokenizer, chat_template("alpaca", tokenizer), max_len=200)
    assert (tok.stats.pairs, tok.stats.kept, tok.stats.dropped) == (2, 1, 1)
    with pytest.raises(DataError) as err:
        read_pairs(path, on_malformed="error")
    assert f"{path}:1" in str(err.value) and "no 'rejected'" in str(err.value) and "\n" not in str(err.value)
