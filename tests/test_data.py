"""Loading, templates, tokenization masks, packing and the resumable iterator."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alpaca_jax.data import (BatchIterator, DataError, alpaca_prompt, build_example,
                             load_instruction_dataset, pack_rows, plan_rows, read_records,
                             tokenize_dataset, train_bpe_tokenizer)
from alpaca_jax.model import Llama, init_params
from alpaca_jax.train.step import loss_and_grads
from helpers import assert_resumes_exactly, random_examples, tiny_model


def test_alpaca_templates_are_the_released_ones():
    with_input = alpaca_prompt("Add the numbers.", "2 and 3")
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:")
    assert alpaca_prompt("Say hi.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:")
    # The original tests `input != ""`: a whitespace-only input still takes the with-input template.
    assert alpaca_prompt("Say hi.", "   ") == alpaca_prompt("Say hi.", "x").replace("\nx\n", "\n   \n")
    assert alpaca_prompt("Say hi.", "   ") != alpaca_prompt("Say hi.")


def test_json_array_and_jsonl_load_the_same_rows(tmp_path):
    rows = [{"instruction": f"Task {i}", "input": "" if i % 2 else "x", "output": f"Out {i}"} for i in range(5)]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=4))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a = load_instruction_dataset([str(tmp_path / "a.json")])
    b = load_instruction_dataset([str(tmp_path / "a.jsonl")])
    assert a.to_list() == b.to_list() == rows


def test_missing_input_field_means_empty(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "I", "output": "O"}) + "\n")
    assert read_records(tmp_path / "a.jsonl") == [{"instruction": "I", "input": "", "output": "O"}]


@pytest.mark.parametrize("layout", ["array", "jsonl"])
def test_malformed_row_names_file_and_line(tmp_path, layout):
    good = {"instruction": "I", "input": "", "output": "O"}
    bad = {"instruction": "I", "input": "", "output": 42}
    if layout == "array":
        path = tmp_path / "d.json"
        path.write_text(json.dumps([good, good, bad], indent=4))
        line = json.dumps([good, good, bad], indent=4).splitlines().index("    {", 0) + 1
        expected_line = 1 + json.dumps([good, good, bad], indent=4).split("\n").__len__() - 6
        del line, expected_line
        text = path.read_text().splitlines()
        start_of_third = [i for i, l in enumerate(text, 1) if l.strip() == "{"][2]
    else:
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in (good, good, bad)))
        start_of_third = 3
    with pytest.raises(DataError, match=rf"d\.json[l]?:{start_of_third}: field 'output' must be a string"):
        read_records(path)


def test_broken_json_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON"):
        read_records(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_instruction_dataset([str(tmp_path / "nope.json")])


def test_loss_mask_covers_response_and_eos_only():
    ids, mask, truncated = build_example([10, 11, 12], [20, 21], bos=1, eos=2, max_len=16)
    assert ids.tolist() == [1, 10, 11, 12, 20, 21, 2]
    assert mask.tolist() == [False, False, False, False, True, True, True]
    assert not truncated
    ids, mask, truncated = build_example([10, 11, 12], [20, 21], bos=1, eos=2, max_len=5)
    assert ids.tolist() == [1, 10, 11, 12, 20] and truncated and mask.sum() == 1


def test_prompt_labels_have_no_effect_on_loss():
    cfg = tiny_model()
    params = init_params(cfg, jax.random.key(0))
    ids, masks = random_examples(np.random.default_rng(0), [10, 8], cfg.vocab_size)
    batch = pack_rows([[0, 1]], ids, masks, 20, pad_id=0)
    scrambled = {k: v.copy() for k, v in batch.items()}
    prompt = scrambled["loss_mask"] == 0
    scrambled["targets"][prompt] = (scrambled["targets"][prompt] + 13) % cfg.vocab_size
    assert prompt.any()
    as_micro = lambda b: {k: jnp.asarray(v)[None] for k, v in b.items()}
    loss_a, grads_a = loss_and_grads(params, Llama(cfg), as_micro(batch))
    loss_b, grads_b = loss_and_grads(params, Llama(cfg), as_micro(scrambled))
    assert float(loss_a) == float(loss_b)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... while a response label does matter
    scrambled["targets"][~prompt & (scrambled["segment_ids"] > 0)] += 1
    assert float(loss_and_grads(params, Llama(cfg), as_micro(scrambled))[0]) != float(loss_a)


def test_packing_places_every_example_once_and_fits():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 64, 500)
    order = rng.permutation(500)
    rows = plan_rows(lengths, order, seq_len=128, window=16)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert lengths.sum() / (len(rows) * 128) > 0.95  # first-fit over a window packs densely
    next_fit = plan_rows(lengths, order, seq_len=128, window=1)
    assert len(rows) < len(next_fit)  # the window is what makes it dense
    assert plan_rows(lengths, order, 128, packing=False) == [[int(i)] for i in order]


def test_packed_segments_and_positions():
    ids = [np.arange(1, 6, dtype=np.int32), np.arange(10, 14, dtype=np.int32)]
    masks = [np.array([0, 0, 1, 1, 1], bool), np.array([0, 1, 1, 1], bool)]
    out = pack_rows([[0, 1]], ids, masks, seq_len=10, pad_id=0)
    assert out["input_ids"][0].tolist() == [1, 2, 3, 4, 10, 11, 12, 0, 0, 0]
    assert out["targets"][0].tolist() == [2, 3, 4, 5, 11, 12, 13, 0, 0, 0]
    assert out["loss_mask"][0].tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    assert out["segment_ids"][0].tolist() == [1, 1, 1, 1, 2, 2, 2, 0, 0, 0]
    assert out["positions"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 0, 0]


def _iterator(ids, masks, **kw):
    args = dict(batch_size=4, seq_len=32, seed=7, num_epochs=2, pad_id=0)
    args.update(kw)
    return BatchIterator(ids, masks, **args)


def test_iterator_is_deterministic_and_resumes_exactly():
    ids, masks = random_examples(np.random.default_rng(0), np.random.default_rng(1).integers(3, 30, 90), 50)
    full = list(_iterator(ids, masks))
    assert len(full) == _iterator(ids, masks).total_steps()
    again = list(_iterator(ids, masks))
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(full, again))
    for stop in (0, 3, len(full) // 2 + 1, len(full) - 1):
        assert_resumes_exactly(lambda: _iterator(ids, masks), full, stop)
    other_seed = list(_iterator(ids, masks, seed=8))
    assert not np.array_equal(other_seed[0]["input_ids"], full[0]["input_ids"])


def test_each_epoch_sees_every_response_token():
    ids, masks = random_examples(np.random.default_rng(0), np.random.default_rng(1).integers(3, 30, 50), 50)
    it = _iterator(ids, masks, num_epochs=1)
    seen = sum(b["loss_mask"].sum() for b in it)
    assert seen == sum(m[1:].sum() for m in masks)


def test_process_shards_partition_the_global_batch():
    ids, masks = random_examples(np.random.default_rng(0), [10] * 16, 50)
    whole = next(_iterator(ids, masks))
    parts = [next(_iterator(ids, masks, shard_index=i, shard_count=2)) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["input_ids"] for p in parts]), whole["input_ids"])


def _bpe(texts):
    return train_bpe_tokenizer(texts, vocab_size=4096)


def _texts(ds):
    return ["\n".join((r["instruction"], r["input"], r["output"])) for r in ds]


@pytest.mark.parametrize("name,rows", [("alpaca_en_demo.json", 999), ("alpaca_zh_demo.json", 1000)])
def test_reference_alpaca_files_load_and_tokenize_completely(shared_data, name, rows):
    ds = load_instruction_dataset([str(shared_data / name)])
    assert len(ds) == rows
    tokenizer = _bpe(_texts(ds))
    kept, stats = tokenize_dataset(ds, tokenizer, max_len=100_000)
    assert stats.kept == rows and stats.truncated == 0 and stats.dropped == 0
    for i in (0, rows // 2, rows - 1):  # byte-level BPE round-trips every character
        row, example = ds[i], kept[i]
        text = tokenizer.decode(example["input_ids"], skip_special_tokens=True)
        assert text == alpaca_prompt(row["instruction"], row["input"]) + row["output"]
        response = tokenizer.decode(example["input_ids"][example["loss_mask"]], skip_special_tokens=True)
        assert response == row["output"]
    if name.startswith("alpaca_zh"):
        assert any("\u4e00" <= ch <= "\u9fff" for ch in ds[0]["output"] + ds[0]["instruction"])


def test_truncation_is_counted():
    """On the bundled seed pool (any clone): every example longer than max_len is cut to it and
    counted, and the rest keep their full length."""
    ds = load_instruction_dataset(["builtin:seed_tasks"])
    tokenizer = _bpe(_texts(ds))
    full, full_stats = tokenize_dataset(ds, tokenizer, max_len=100_000)
    assert full_stats.truncated == 0 and full_stats.kept == len(ds)
    full_lengths = [len(x) for x in full["input_ids"]]
    max_len = 96
    kept, stats = tokenize_dataset(ds, tokenizer, max_len=max_len)
    assert stats.truncated == sum(n > max_len for n in full_lengths) > 0
    assert stats.kept + stats.dropped == stats.examples == len(ds)
    assert max(len(x) for x in kept["input_ids"]) == max_len
    assert stats.tokens == sum(len(x) for x in kept["input_ids"]) < sum(full_lengths)


def test_seed_tasks_convert_to_alpaca_rows(shared_data):
    path = shared_data / "seed_tasks.jsonl"
    tasks = [json.loads(line) for line in path.read_text().splitlines()]
    rows = read_records(path)
    assert len(rows) == sum(len(t["instances"]) for t in tasks) == 175
    assert rows[0] == {"instruction": tasks[0]["instruction"], "input": tasks[0]["instances"][0]["input"],
                       "output": tasks[0]["instances"][0]["output"]}
    assert sum(r["input"] == "" for r in rows) == 50


def test_local_hf_tokenizer_without_pad_falls_back_to_eos(tmp_path):
    """A LLaMA-like tokenizer directory (bos/eos, no pad) loads offline via AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast

    from alpaca_jax.config import TokenizerConfig
    from alpaca_jax.data import get_tokenizer, special_ids
    base = train_bpe_tokenizer(["hello world, the quick brown fox"] * 20, vocab_size=300)
    llama_like = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer,
                                         bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    llama_like.save_pretrained(str(tmp_path / "tok"))
    tokenizer = get_tokenizer(TokenizerConfig(path=str(tmp_path / "tok")), 512, tmp_path / "run", [])
    ids = special_ids(tokenizer)
    assert tokenizer.pad_token_id is None and ids.pad == ids.eos == tokenizer.convert_tokens_to_ids("</s>")
    assert ids.bos == tokenizer.convert_tokens_to_ids("<s>")
    assert not (tmp_path / "run" / "tokenizer").exists()  # a configured tokenizer is not retrained
    with pytest.raises(DataError, match="model.vocab_size"):
        get_tokenizer(TokenizerConfig(path=str(tmp_path / "tok")), 100, tmp_path / "run", [])
    with pytest.raises(DataError, match="tokenizer directory not found"):
        get_tokenizer(TokenizerConfig(path=str(tmp_path / "nope")), 512, tmp_path / "run", [])
