"""Benchmark: the work of `alpaca-jax eval` with a small model, ours vs transformers, one run.

One random-init small LLaMA (our `tiny` preset: hidden 128, 4 layers, 4 heads / 2 KV heads, MLP
352, vocab 2048; a byte-level BPE trained on the Alpaca text) is written once as a Hugging Face directory; both
sides load that same directory, so they hold identical weights:

    eval_loss   mean response-token loss over the Alpaca demo rows (../shared/data/alpaca_en_demo.json,
                999 rows, all used) with their references:
                ours  alpaca_jax.eval.perplexity.reference_loss: tokenize, pack, jitted forward (cold =
                      first call, compile included; warm = second call)
                hf    the same tokenized examples, sorted by length, in right-padded batches of 8
                      through LlamaForCausalLM (torch.inference_mode), masked cross-entropy summed
    generate    greedy answers to the 252 Self-Instruct user-oriented instructions
                (../shared/data/user_oriented_instructions.jsonl), Alpaca template, at most
                --max-new-tokens each, batches of 16:
                ours  alpaca_jax.infer.generate (KV-cached; cold and warm)
                hf    model.generate(do_sample=False) on left-padded batches sorted by length

Both sides use every CPU core (XLA's and torch's default thread pools). The loss values must
agree (same weights, same tokens); generated token agreement is reported as a check.

    python benchmarks/eval.py            # default: all rows, 64 new tokens  -> benchmarks/results/eval.json
    python benchmarks/eval.py --quick    # 100 loss rows, 32 instructions, 16 new tokens (smoke run)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import load_average, machine  # noqa: E402  (this folder, on sys.path)
SHARED = REPO.parent / "shared" / "data"

# Our `tiny` preset (configs/model/tiny.yaml): the model the README's first command trains.
SHAPES = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
              tie_word_embeddings=False)
VOCAB = 2048


def _build_model(directory: Path, rows) -> None:
    """A random LLaMA and a BPE trained on the rows' text, saved as one HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alpaca_jax.data import alpaca_prompt, train_bpe_tokenizer
    texts = [t for r in rows for t in (alpaca_prompt(r["instruction"], r["input"]), r["output"])]
    tokenizer = train_bpe_tokenizer(texts, VOCAB)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPES)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _hf_loss(model, examples, batch_size: int = 8) -> tuple[float, int]:
    """Sum / count of response-token cross-entropy, the way a transformers user would batch it."""
    import torch
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = [examples[i] for i in order[start:start + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            weight = torch.zeros((len(chunk), width), dtype=torch.float32)
            for row, (example, mask) in enumerate(chunk):
                ids[row, :len(example)] = torch.as_tensor(example)
                attention[row, :len(example)] = 1
                weight[row, :len(example)] = torch.as_tensor(mask, dtype=torch.float32)
            logits = model(input_ids=ids, attention_mask=attention).logits.float()
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            total += float((losses * weight[:, 1:]).sum())
            count += int(weight[:, 1:].sum())
    return total / count, count


def _hf_generate(model, prompt_ids, max_new_tokens: int, pad_id: int, eos_id: int, batch_size: int = 16):
    import torch
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    outputs: list[list[int]] = [None] * len(prompt_ids)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(prompt_ids[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # left padding, as generate() needs
                ids[row, width - len(prompt_ids[i]):] = torch.as_tensor(prompt_ids[i])
                attention[row, width - len(prompt_ids[i]):] = 1
            out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id)
            for row, i in enumerate(chunk):
                new = out[row, width:].tolist()
                outputs[i] = new[:new.index(eos_id) + 1] if eos_id in new else new
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 loss rows, 32 instructions, 16 new tokens")
    parser.add_argument("--max-new-tokens", type=int, help="tokens generated per answer (default 64; quick 16)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval.json"))
    parser.add_argument("--data-dir", default=str(SHARED), help="folder with the shared data files (default ../shared/data)")
    args = parser.parse_args()
    load_before = load_average()
    data_dir = Path(args.data_dir)
    import datasets
    import torch
    from transformers import LlamaForCausalLM

    from alpaca_jax.data import tokenize_dataset
    from alpaca_jax.eval import load_eval_file
    from alpaca_jax.eval.perplexity import reference_loss
    from alpaca_jax.infer import Row, SamplingConfig, decode_rows, load_model

    rows = json.loads((data_dir / "alpaca_en_demo.json").read_text())
    instructions = load_eval_file(data_dir / "user_oriented_instructions.jsonl")
    loss_rows = 100 if args.quick else len(rows)
    answers = 32 if args.quick else len(instructions)
    max_new = args.max_new_tokens or (16 if args.quick else 64)
    rows = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]} for r in rows]
    items = load_eval_file(data_dir / "alpaca_en_demo.json")[:loss_rows]
    instructions = instructions[:answers]

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "small-llama"
        _build_model(hf_dir, rows)
        ours = load_model(hf_dir)
        hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        result = {"model": {**SHAPES, "vocab_size": VOCAB,
                            "parameters": sum(p.numel() for p in hf.parameters())},
                  "loss_rows": loss_rows, "instructions": answers, "max_new_tokens": max_new,
                  "torch_threads": torch.get_num_threads()}

        (cold, _), cold_s = _timed(lambda: reference_loss(ours, items))
        (warm, _), warm_s = _timed(lambda: reference_loss(ours, items))

        def hf_loss():
            kept, _ = tokenize_dataset(datasets.Dataset.from_list(
                [{"instruction": i.instruction, "input": i.input, "output": i.reference} for i in items]),
                ours.tokenizer, ours.max_len, ours.add_bos)
            return _hf_loss(hf, list(zip(kept["input_ids"], kept["loss_mask"])))
        (hf_value, hf_tokens), hf_s = _timed(hf_loss)
        result["eval_loss"] = {"ours_cold_s": cold_s, "ours_warm_s": warm_s, "transformers_s": hf_s,
                               "ours_loss": warm.loss, "transformers_loss": hf_value,
                               "tokens_scored": warm.tokens, "transformers_tokens_scored": hf_tokens,
                               "speedup_warm": hf_s / warm_s, "speedup_cold": hf_s / cold_s}
        print(json.dumps(result["eval_loss"], indent=1), flush=True)

        prompt_ids = [ours.encode_messages(i.messages) for i in instructions]
        sampling = SamplingConfig(max_new_tokens=max_new)
        rows = [Row(ids, sampling) for ids in prompt_ids]
        ours_out, gen_cold_s = _timed(lambda: decode_rows(ours, rows, 16))
        ours_out, gen_warm_s = _timed(lambda: decode_rows(ours, rows, 16))
        hf_out, hf_gen_s = _timed(lambda: _hf_generate(hf, prompt_ids, max_new, ours.tokenizer.pad_token_id,
                                                       ours.eos_id))
        ours_tokens = sum(len(c.token_ids) for c in ours_out)
        same = sum(list(c.token_ids) == h for c, h in zip(ours_out, hf_out))
        result["generate"] = {"ours_cold_s": gen_cold_s, "ours_warm_s": gen_warm_s, "transformers_s": hf_gen_s,
                              "ours_tokens": ours_tokens, "transformers_tokens": sum(len(h) for h in hf_out),
                              "identical_answers": same, "speedup_warm": hf_gen_s / gen_warm_s,
                              "speedup_cold": hf_gen_s / gen_cold_s}
        print(json.dumps(result["generate"], indent=1), flush=True)

    result["machine"] = machine(load_before)  # other work sharing the cores makes figures indicative
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
