"""Benchmark: the data path (render, tokenize, mask, batch), ours vs transformers' chat templates.

Two data sets from `../shared/data`: the 500 ShareGPT conversations (`dummy_conversation.json`,
Vicuna v1.1 template) and the 999 Alpaca rows (`alpaca_en_demo.json`, Alpaca template). Both
sides use the same byte-level BPE (trained here on the rendered text) and produce ids plus an
assistant-only loss mask:
- ours: `tokenize_conversations` (render with character spans, one batched fast-tokenizer call
  with offsets) then `BatchIterator` over one epoch: packed rows of `--max-len`, and padded
  rows (`data.packing=false`, one example per row padded to max_len);
- transformers: the same template written as a Jinja `chat_template` with `{% generation %}`
  markers, `apply_chat_template(..., return_assistant_tokens_mask=True)` on the whole list, then
  a padded collator (each batch padded to its longest example, labels -100 outside the mask),
  what a user of TRL/HF Trainer would otherwise pick.
Reported: examples/s, tokens/s (real tokens), packing efficiency (real tokens / row positions),
and whether the two sides' masks agree. The target is a data path at least 10x faster than a
train step consumes tokens on the tiny config, measured in the same run (`train()` with
configs/tiny.yaml, a few steps).

    python benchmarks/data_pipeline.py            # writes benchmarks/results/data_pipeline.json
    python benchmarks/data_pipeline.py --quick    # one repeat, no train-step measurement
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import load_average, machine  # noqa: E402  (this folder, on sys.path)

from alpaca_jax.data import (BatchIterator, chat_template, read_conversations,  # noqa: E402
                             tokenize_conversations, train_bpe_tokenizer)
from alpaca_jax.data.chat import VICUNA_SYSTEM  # noqa: E402
from alpaca_jax.data.templates import PROMPT_NO_INPUT, PROMPT_WITH_INPUT  # noqa: E402

BATCH = 8

VICUNA_JINJA = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set msgs = messages[1:] -%}{%- else -%}{%- set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -%}"
    "{%- set msgs = messages -%}{%- endif -%}{{- system + ' ' -}}"
    "{%- for m in msgs -%}{%- if m['role'] == 'user' -%}{{- 'USER: ' + m['content'] + ' ASSISTANT: ' -}}"
    "{%- else -%}{%- generation -%}{{- m['content'] + eos_token -}}{%- endgeneration -%}{%- endif -%}"
    "{%- endfor -%}")


def _jinja(text: str) -> str:
    return text.replace("\n", "\\n").replace("'", "\\'")


ALPACA_JINJA = (
    "{%- set u = messages[0] -%}{%- if u.get('input', '') != '' -%}"
    "{{- '" + _jinja(PROMPT_WITH_INPUT.split("{instruction}")[0]) + "' + u['content'] + '"
    + _jinja(PROMPT_WITH_INPUT.split("{instruction}")[1].split("{input}")[0]) + "' + u['input'] + '"
    + _jinja(PROMPT_WITH_INPUT.split("{input}")[1]) + "' -}}"
    "{%- else -%}{{- '" + _jinja(PROMPT_NO_INPUT.split("{instruction}")[0]) + "' + u['content'] + '"
    + _jinja(PROMPT_NO_INPUT.split("{instruction}")[1]) + "' -}}{%- endif -%}"
    "{%- generation -%}{{- messages[1]['content'] + eos_token -}}{%- endgeneration -%}")


def _messages(conv) -> list[dict]:
    return [{"role": t.role, "content": t.content, **({"input": t.input} if t.input else {})} for t in conv.turns]


def ours(convs, tokenizer, template, max_len: int) -> dict:
    start = time.perf_counter()
    ids, masks, stats = tokenize_conversations(convs, tokenizer, template, max_len)
    tokenized = time.perf_counter()
    out = {}
    for packing in (True, False):
        t0 = time.perf_counter()
        it = BatchIterator(ids, masks, batch_size=BATCH, seq_len=max_len, seed=0, num_epochs=1,
                           pad_id=tokenizer.pad_token_id, packing=packing)
        rows = sum(batch["input_ids"].shape[0] for batch in it)
        out["packed" if packing else "padded"] = {
            "batch_s": time.perf_counter() - t0, "rows": rows,
            # Over the epoch's planned rows; the final batch's filler rows are not counted.
            "packing_efficiency": it.packing_efficiency(0)}
    return {"tokenize_s": tokenized - start, "tokens": stats.tokens, "examples": stats.kept,
            "loss_tokens": stats.loss_tokens, "ids": ids, "masks": masks, **out}


def transformers_side(convs, tokenizer, jinja: str) -> dict:
    tokenizer.chat_template = jinja
    start = time.perf_counter()
    enc = tokenizer.apply_chat_template([_messages(c) for c in convs], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    tokenized = time.perf_counter()
    real = rows_positions = 0
    for i in range(0, len(convs), BATCH):  # the padded collator (labels -100 outside the mask)
        ids, masks = enc["input_ids"][i:i + BATCH], enc["assistant_masks"][i:i + BATCH]
        longest = max(len(x) for x in ids)
        batch_ids = np.full((len(ids), longest), tokenizer.pad_token_id, np.int64)
        labels = np.full((len(ids), longest), -100, np.int64)
        for b, (x, m) in enumerate(zip(ids, masks)):
            batch_ids[b, :len(x)] = x
            labels[b, :len(x)] = np.where(np.asarray(m, bool), x, -100)
        real += sum(len(x) - 1 for x in ids)
        rows_positions += len(ids) * longest
    collated = time.perf_counter()
    return {"tokenize_s": tokenized - start, "batch_s": collated - tokenized,
            "tokens": sum(len(x) for x in enc["input_ids"]), "examples": len(convs),
            "loss_tokens": int(sum(sum(m) for m in enc["assistant_masks"])),
            "packing_efficiency": real / rows_positions, "ids": enc["input_ids"], "masks": enc["assistant_masks"]}


def _median(runs: list[dict]) -> dict:
    best = runs[0]
    for key in ("tokenize_s", "batch_s"):
        if key in best:
            best[key] = statistics.median(r[key] for r in runs)
    for mode in ("packed", "padded"):
        if mode in best:
            best[mode]["batch_s"] = statistics.median(r[mode]["batch_s"] for r in runs)
    return best


def compare(name: str, convs, tokenizer, template, jinja: str, max_len: int, repeats: int) -> dict:
    # One untimed pass each first (the BPE's word cache and the tokenizer's thread pool warm
    # up), then the two sides interleaved, so background load hits both alike.
    ours(convs, tokenizer, template, max_len), transformers_side(convs, tokenizer, jinja)
    runs_a, runs_b = [], []
    for _ in range(repeats):
        runs_a.append(ours(convs, tokenizer, template, max_len))
        runs_b.append(transformers_side(convs, tokenizer, jinja))
    a, b = _median(runs_a), _median(runs_b)
    # Same rendering and masking? Ours has BOS first; theirs has none.
    same_ids = sum(list(x[1:]) == list(y) for x, y in zip(a["ids"], b["ids"]))
    same_masks = sum(list(m[1:]) == [bool(v) for v in n] for m, n in zip(a["masks"], b["masks"]))
    ours_s = a["tokenize_s"] + a["packed"]["batch_s"]
    theirs_s = b["tokenize_s"] + b["batch_s"]
    result = {
        "examples": a["examples"], "tokens": a["tokens"], "loss_tokens": {"ours": a["loss_tokens"], "transformers": b["loss_tokens"]},
        "identical_ids": same_ids, "identical_masks": same_masks,
        "ours": {"tokenize_s": a["tokenize_s"], "pack_s": a["packed"]["batch_s"], "total_s": ours_s,
                 "examples_per_s": a["examples"] / ours_s, "tokens_per_s": a["tokens"] / ours_s,
                 "packing_efficiency_packed": a["packed"]["packing_efficiency"],
                 "packing_efficiency_padded_to_max_len": a["padded"]["packing_efficiency"]},
        "transformers": {"tokenize_s": b["tokenize_s"], "collate_s": b["batch_s"], "total_s": theirs_s,
                         "examples_per_s": b["examples"] / theirs_s, "tokens_per_s": b["tokens"] / theirs_s,
                         "packing_efficiency_padded_per_batch": b["packing_efficiency"]},
        "speedup": theirs_s / ours_s,
    }
    print(f"{name}: ours {result['ours']['examples_per_s']:,.0f} ex/s {result['ours']['tokens_per_s']:,.0f} tok/s "
          f"(packed {100 * result['ours']['packing_efficiency_packed']:.1f}%) | transformers "
          f"{result['transformers']['examples_per_s']:,.0f} ex/s {result['transformers']['tokens_per_s']:,.0f} tok/s "
          f"(padded {100 * result['transformers']['packing_efficiency_padded_per_batch']:.1f}%) | "
          f"{result['speedup']:.2f}x; identical ids {same_ids}/{len(convs)}, masks {same_masks}/{len(convs)}")
    return result


def train_step_token_rate(steps: int) -> dict:
    """Tokens/s of the tiny config's train steps (configs/tiny.yaml), compile excluded."""
    from alpaca_jax.config import load_config
    from alpaca_jax.train import read_metrics, train
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "configs" / "tiny.yaml",
                          [f"train.max_steps={steps}", "train.log_every=5", "train.progress_bar=false",
                           "run.tensorboard=false", "checkpoint.every=null", f"run.dir={tmp}/run"])
        train(cfg)
        records = read_metrics(Path(tmp) / "run")[2:]  # after step 1 (compile) and its window
    rates = [r["tokens_per_second"] for r in records]
    return {"steps": steps, "tokens_per_s_median": statistics.median(rates), "windows": rates}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--max-len", type=int, default=2048, help="row length for our packing (nothing is truncated)")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per side (median)")
    parser.add_argument("--quick", action="store_true", help="one repeat, no train-step measurement")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "data_pipeline.json")
    args = parser.parse_args(argv)
    load_before = load_average()
    repeats = 1 if args.quick else args.repeats
    for name in ("dummy_conversation.json", "alpaca_en_demo.json"):
        if not (args.data_dir / name).is_file():
            sys.exit(f"benchmark data not found: {args.data_dir / name} (pass --data-dir)")
    conversations, _ = read_conversations(args.data_dir / "dummy_conversation.json")
    alpaca, _ = read_conversations(args.data_dir / "alpaca_en_demo.json")
    vicuna, alpaca_template = chat_template("vicuna_v1.1"), chat_template("alpaca")
    corpus = [vicuna.render(c).text for c in conversations] + [alpaca_template.render(c).text for c in alpaca]
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=8192)
    results = {
        "machine": machine(load_before),
        "batch_rows": BATCH, "max_len": args.max_len, "repeats": repeats,
        "conversations_vicuna": compare("500 ShareGPT conversations (vicuna_v1.1)", conversations, tokenizer,
                                        vicuna, VICUNA_JINJA, args.max_len, repeats),
        "alpaca": compare("999 Alpaca rows (alpaca)", alpaca, tokenizer, alpaca_template, ALPACA_JINJA,
                          args.max_len, repeats),
    }
    if not args.quick:
        step = train_step_token_rate(40)
        results["tiny_train_step"] = step
        slowest = min(results[k]["ours"]["tokens_per_s"] for k in ("conversations_vicuna", "alpaca"))
        results["data_over_train_rate"] = slowest / step["tokens_per_s_median"]
        print(f"tiny train step: {step['tokens_per_s_median']:,.0f} tok/s; our slowest data path is "
              f"{results['data_over_train_rate']:.0f}x that (target >= 10x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
