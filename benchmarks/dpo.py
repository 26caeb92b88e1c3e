"""DPO step time: ours (JAX, pairs packed side by side) vs TRL's DPOTrainer (PyTorch), CPU, fp32.

The same tiny-but-not-trivial LLaMA (built once in PyTorch, loaded into both), the same pairs (random
token ids, prompt and answer lengths drawn as in chat data: prompts 32-160 tokens, answers
16-192), one optimizer step over all of them: policy forward and backward, reference forward,
AdamW update. TRL's step is its own loss (`DPOTrainer.compute_loss` on its collator's batch:
chosen and rejected rows padded to the longest sequence) then backward and `torch.optim.AdamW`;
ours is `preference_train_step` jitted (compile excluded) on packed rows of 2 x max_len.
Steps alternate (ours, TRL, ours, ...) so contention from other processes hits both alike; the
best of N of each is reported, and their ratio.

    python benchmarks/dpo.py             # ~2 min on 2 shared CPU cores
    python benchmarks/dpo.py --quick     # a smoke run

Writes benchmarks/results/dpo.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from alpaca_jax import hf
from alpaca_jax.config import ModelConfig, OptimizerConfig, PreferenceConfig
from alpaca_jax.data.preference_batches import PairBatchIterator, PairStats, TokenizedPairs
from alpaca_jax.model import Llama
from alpaca_jax.train.optim import learning_rate_schedule, make_optimizer
from alpaca_jax.train.preference_step import preference_train_step
from alpaca_jax.train.state import fresh_train_state
from machine import load_average, machine  # this folder (a script's own is on sys.path)

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "benchmarks" / "results" / "dpo.json"
SHAPE = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6)


def _pairs(n: int, seed: int, vocab: int, scale: float) -> list[dict]:
    rng = np.random.default_rng(seed)
    size = lambda low, high: int(rng.integers(int(low * scale), int(high * scale) + 1))  # noqa: E731
    return [{"prompt_ids": [1] + rng.integers(3, vocab, size(32, 160)).tolist(),
             "chosen_ids": rng.integers(3, vocab, size(16, 192)).tolist() + [2],
             "rejected_ids": rng.integers(3, vocab, size(16, 192)).tolist() + [2]} for _ in range(n)]


def _tokenized(pairs: list[dict]) -> TokenizedPairs:
    def side(key):
        return ([np.asarray(p["prompt_ids"] + p[key], np.int32) for p in pairs],
                [np.asarray([0] * len(p["prompt_ids"]) + [1] * len(p[key]), bool) for p in pairs])
    (ci, cm), (ri, rm) = side("chosen_ids"), side("rejected_ids")
    return TokenizedPairs(ci, cm, ri, rm, PairStats(len(pairs), len(pairs), 0, 0, 0, 0))


def ours(hf_dir: Path, pairs: list[dict], max_len: int):
    """A function running one jitted DPO step (blocking), and the batch's shape and packing."""
    cfg = ModelConfig(vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["hidden_size"],
                      intermediate_size=SHAPE["intermediate_size"], num_layers=SHAPE["num_hidden_layers"],
                      num_heads=SHAPE["num_attention_heads"], num_kv_heads=SHAPE["num_key_value_heads"],
                      max_position_embeddings=SHAPE["max_position_embeddings"], attention="chunked")
    policy = hf.load_hf_params(hf_dir, cfg)
    reference = hf.load_hf_params(hf_dir, cfg)
    probe = PairBatchIterator(_tokenized(pairs), batch_size=1, seq_len=2 * max_len, seed=0, num_epochs=1,
                              pad_id=0, packing=True)
    rows = len(probe.epoch_rows(0))
    it = PairBatchIterator(_tokenized(pairs), batch_size=rows, seq_len=2 * max_len, seed=0, num_epochs=1,
                           pad_id=0, packing=True)
    batch = {k: jnp.asarray(v)[None] for k, v in next(it).items()}  # [A=1, rows, T]
    schedule = learning_rate_schedule(OptimizerConfig(learning_rate=1e-6, schedule="constant", warmup_ratio=0.0), 10)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-6, schedule="constant", warmup_ratio=0.0),
                               schedule, None)
    model = Llama(cfg)
    step = jax.jit(functools.partial(preference_train_step, model=model, ref_model=model, cfg=PreferenceConfig(),
                                     slots=it.slots, optimizer=optimizer, schedule=schedule), donate_argnums=0)
    state = {"s": fresh_train_state(policy, optimizer)}
    frozen = {"reference": reference}

    def run():
        state["s"], metrics = step(state["s"], batch, frozen)
        jax.block_until_ready(metrics["loss"])
    run()  # compile
    real = int(np.asarray(batch["segment_ids"] > 0).sum())
    return run, {"rows": rows, "row_length": 2 * max_len, "packing_efficiency": real / (rows * 2 * max_len)}


def trl(hf_dir: Path, pairs: list[dict], work: Path):
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer
    policy = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    reference = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}, unk_token="<unk>")),
        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    args = DPOConfig(output_dir=str(work / "trl"), beta=0.1, loss_type=["sigmoid"], report_to="none", use_cpu=True,
                     per_device_train_batch_size=len(pairs), max_length=None, bf16=False)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    trainer.model.train()
    batch = trainer.data_collator(pairs)
    optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=1e-6)

    def run():
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    run()  # warm-up
    return run, {"rows": int(batch["input_ids"].shape[0]), "row_length": int(batch["input_ids"].shape[1]),
                 "packing_efficiency": float(batch["attention_mask"].float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    load_before = load_average()
    scale, n_pairs, rounds = (0.25, 4, 2) if args.quick else (1.0, 16, 5)
    rounds = args.rounds or rounds
    max_len = int(352 * scale)  # longest possible sequence: 1 + 160 + 192 (+ EOS) at full scale
    pairs = _pairs(n_pairs, 0, SHAPE["vocab_size"], scale)
    from transformers import LlamaConfig, LlamaForCausalLM
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(work / "model")
        ours_step, ours_batch = ours(work / "model", pairs, max_len)
        trl_step, trl_batch = trl(work / "model", pairs, work)
        times = {"ours": [], "trl": []}
        for _ in range(rounds):
            for name, step in (("ours", ours_step), ("trl", trl_step)):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    result = {
        "command": "python benchmarks/dpo.py" + (" --quick" if args.quick else ""),
        "machine": machine(load_before), "torch_threads": torch.get_num_threads(),
        "shape": SHAPE, "pairs": n_pairs, "max_len": max_len, "rounds": rounds,
        "tokens": {"real": int(sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])
                                   for p in pairs))},
        "ours": {"best_step_s": best["ours"], "steps_s": times["ours"], **ours_batch},
        "trl": {"best_step_s": best["trl"], "steps_s": times["trl"], **trl_batch},
        "speedup": best["trl"] / best["ours"],
    }
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    if not args.quick:
        OUTPUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("speedup",)} | {"ours_s": best["ours"], "trl_s": best["trl"],
                                                              "ours_rows": ours_batch, "trl_rows": trl_batch}))


if __name__ == "__main__":
    main()
