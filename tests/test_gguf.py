"""GGUF export, checked by llama.cpp itself (llama-cpp-python, built from PyPI).

One tiny model serves most tests: trained here for a few seconds (our own `train_step` on packed
Alpaca rows, no checkpointing or data pipeline around it) until it answers its training prompts
with clear margins, so greedy tokens are not near-ties that quantization noise could flip, and
held-out perplexity is far below the vocabulary size, so quantization error is measurable.
llama.cpp must give our logits (f32), our greedy tokens, training's token ids for our BPE, a
SentencePiece BPE and a LLaMA-3-style BPE, the training prompt through `create_chat_completion`,
and a GGUF LoRA adapter on the base equal to the merged file.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from pathlib import Path

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sentencepiece
from llama_cpp import GGML_TYPE_F32, Llama, LogitsProcessorList
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerFast

from alpaca_jax.checkpoint import restore_params, save_params
from alpaca_jax.config import Config, LoraConfig, RopeScalingConfig, TokenizerConfig, save_config
from alpaca_jax.data.packing import pack_rows, plan_rows
from alpaca_jax.data.templates import alpaca_prompt
from alpaca_jax.data.tokenize import tokenize_dataset
from alpaca_jax.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from alpaca_jax.gguf_export import export_gguf
from alpaca_jax.hf import export_hf
from alpaca_jax.infer import SamplingConfig, generate, load_model
from alpaca_jax.model import Llama as OurLlama
from alpaca_jax.model import init_params
from alpaca_jax.model.params import adapter_shapes
from alpaca_jax.train.state import fresh_train_state
from alpaca_jax.train.step import train_step
from helpers import random_params, tiny_model

# One thread: these models are tiny, and llama.cpp's threads spin-wait for each other, which
# costs far more than it gains on a CI machine whose 2 cores are busy with other work.
# llama.cpp keeps its KV cache in f16 unless told otherwise: f32 here, so an f32 export is
# compared with f32 arithmetic end to end (the quantized files keep the default).
F32_CACHE = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


def _rows(numbers) -> list[dict]:
    """Answers a 2-layer model can learn in seconds: copying from the prompt, no arithmetic."""
    return ([{"instruction": f"Add {i} and {i + 3}.", "input": "",
              "output": f"The sum of {i} and {i + 3} is {i} plus {i + 3}."} for i in numbers]
            + [{"instruction": "Name a colour.", "input": f"Like {COLOURS[i % 8]}, number {i}",
                "output": f"The colour {COLOURS[i % 8]} is a fine colour."} for i in numbers])


TRAIN_ROWS, HELD_OUT_ROWS = _rows(range(400)), _rows(range(400, 405))
TRAIN_TEXTS = [alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in TRAIN_ROWS]
SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
             max_position_embeddings=256)  # rows of 64 and 128: whole q8_0 / q4_0 blocks of 32
PROMPTS = [alpaca_prompt("Add 7 and 10."), alpaca_prompt("Name a colour.", "Like orange, number 5"),
           alpaca_prompt("Add 123 and 126."), alpaca_prompt("Name a colour.", "Like green, number 77"),
           alpaca_prompt("Tell me about the colour blue.")]
ROWS = [{"instruction": "Add 7 and 10.", "input": "", "output": "17"},
        {"instruction": "Name a colour.", "input": "Like orange, number 5", "output": "orange"}]
# Whitespace runs, tabs, digits, contractions, accents and CJK: where pre-tokenizers differ.
TRICKY = "Don't  stop:\n\n\tCafé naïve 東京 12345 x\n  ### Response:"
NEW_TOKENS = 16
TRAIN_STEPS, BATCH, SEQ_LEN = 150, 16, 128


def _trained_params(cfg, tokenizer, seed: int = 0):
    """TRAIN_STEPS Adam steps of our train_step on packed TRAIN_ROWS (response tokens in the loss)."""
    tokenized, _ = tokenize_dataset(datasets.Dataset.from_list(TRAIN_ROWS), tokenizer, SEQ_LEN, add_bos=True)
    ids = [np.asarray(r["input_ids"]) for r in tokenized]
    masks = [np.asarray(r["loss_mask"]) for r in tokenized]
    optimizer = optax.adam(3e-3)
    step = jax.jit(functools.partial(train_step, model=OurLlama(cfg), optimizer=optimizer,
                                     schedule=optax.constant_schedule(3e-3)))
    state = fresh_train_state(init_params(cfg, jax.random.key(seed)), optimizer)
    rng, rows = np.random.default_rng(seed), []
    for _ in range(TRAIN_STEPS):
        if len(rows) < BATCH:  # another epoch, reshuffled
            rows += plan_rows([len(i) - 1 for i in ids], rng.permutation(len(ids)), SEQ_LEN)
        batch = pack_rows(rows[:BATCH], ids, masks, SEQ_LEN, tokenizer.eos_token_id)
        rows = rows[BATCH:]
        state, metrics = step(state, jax.tree.map(lambda x: x[None], batch))
    assert float(metrics["loss"]) < 0.5, float(metrics["loss"])  # it learned to answer
    return jax.tree.map(np.asarray, state.params)


def _save_run(root: Path, model_cfg, params, tokenizer, **config) -> Path:
    root.mkdir(parents=True)
    save_params(root, params)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    save_config(Config(model=model_cfg, tokenizer=TokenizerConfig(add_bos=True), **config), root / "config.yaml")
    return root


@pytest.fixture(scope="session")
def run(tmp_path_factory) -> Path:
    tokenizer = train_bpe_tokenizer(TRAIN_TEXTS, 512, 1)
    cfg = tiny_model(**SHAPE)
    return _save_run(tmp_path_factory.mktemp("gguf") / "run", cfg, _trained_params(cfg, tokenizer), tokenizer)


@pytest.fixture(scope="session")
def gguf_files(run) -> dict[str, Path]:
    return {t: export_gguf(run, run.parent / f"run-{t}.gguf", type=t) for t in ("f32", "f16", "q8_0", "q4_0")}


@pytest.fixture(scope="session")
def llama_cpp(gguf_files) -> dict[str, Llama]:
    """One llama.cpp model per exported type (each loads in well under a second)."""
    return {t: Llama(str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False,
                     **(F32_CACHE if t == "f32" else {}))
            for t, path in gguf_files.items()}


@pytest.fixture(scope="session")
def ours(run) -> dict:
    """Our greedy completions of PROMPTS, and the prompt ids as our decoder encodes them."""
    model = load_model(run)
    completions = generate(model, PROMPTS, SamplingConfig(max_new_tokens=NEW_TOKENS))
    return {"ids": [model.encode(p) for p in PROMPTS], "completions": completions}


def _our_logits(cfg, params, ids: list[int]) -> np.ndarray:
    ids = np.asarray([ids])
    positions = np.arange(ids.shape[1])[None]
    return np.asarray(jax.jit(OurLlama(cfg).apply)({"params": params}, jnp.asarray(ids), jnp.asarray(positions),
                                                   jnp.ones(ids.shape, jnp.int32)))[0]


def _their_logits(llm: Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def _their_greedy(llm: Llama, ids: list[int], count: int) -> list[int]:
    """llama.cpp's own greedy sampler (temperature 0), stopping at EOS as ours does."""
    out = []
    for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
        if token == llm.token_eos() or len(out) == count:
            break
        out.append(token)
    return out


def _training_prompt_ids(tokenizer, rows=ROWS) -> list[list[int]]:
    """The prompt part (loss mask off) of each row's ids, as training built them."""
    tokenized, _ = tokenize_dataset(datasets.Dataset.from_list(rows), tokenizer, 512, add_bos=True)
    return [[int(t) for t, m in zip(row["input_ids"], row["loss_mask"]) if not m] for row in tokenized]


# -- f32: llama.cpp computes our function ------------------------------------------------------

def test_f32_logits_equal_ours(run, llama_cpp, ours, tmp_path):
    """From the run, and from its `export-hf` directory (RUN may be a HF LLaMA directory)."""
    ids = ours["ids"][0]
    mine = _our_logits(tiny_model(**SHAPE), restore_params(run / "params"), ids)
    assert np.abs(mine).max() > 5.0  # a meaningful scale, not a near-zero comparison
    np.testing.assert_array_less(np.abs(_their_logits(llama_cpp["f32"], ids) - mine).max(), 1e-3)
    from_hf = export_gguf(export_hf(run, tmp_path / "hf"), tmp_path / "from-hf.gguf", type="f32")
    llm = Llama(str(from_hf), n_ctx=256, n_threads=1, logits_all=True, verbose=False, **F32_CACHE)
    np.testing.assert_array_less(np.abs(_their_logits(llm, ids) - mine).max(), 1e-3)
    assert llm.metadata["tokenizer.chat_template"] == llama_cpp["f32"].metadata["tokenizer.chat_template"]


def test_f32_greedy_generation_gives_our_tokens(llama_cpp, ours):
    for ids, completion in zip(ours["ids"], ours["completions"]):
        assert _their_greedy(llama_cpp["f32"], ids, NEW_TOKENS) == completion.token_ids


def test_llama3_shapes_logits_equal_ours(tmp_path):
    """LLaMA-3.1 features in miniature: rope scaling (rope_freqs), theta 5e5, one KV head,
    head_dim != hidden / heads, tied embeddings, unscanned layers; positions past the original
    context, where the scaling changes the rotary frequencies."""
    cfg = tiny_model(**{**SHAPE, "num_kv_heads": 1, "head_dim": 24, "rope_theta": 500000.0, "tie_embeddings": True,
                        "rope_scaling": RopeScalingConfig(original_max_position_embeddings=32), "scan_layers": False})
    params = random_params(cfg, seed=3)
    run = _save_run(tmp_path / "llama3", cfg, params, train_bpe_tokenizer(TRAIN_TEXTS[:50], 512, 1))
    llm = Llama(str(export_gguf(run, tmp_path / "llama3.gguf", type="f32")), n_ctx=256, n_threads=1,
                logits_all=True, verbose=False, **F32_CACHE)
    ids = np.random.default_rng(0).integers(4, 512, 120).tolist()
    theirs = _their_logits(llm, ids)
    np.testing.assert_array_less(np.abs(theirs - _our_logits(cfg, params, ids)).max(), 1e-3)
    unscaled = _our_logits(dataclasses.replace(cfg, rope_scaling=None), params, ids)
    assert np.abs(theirs - unscaled).max() > 1e-2  # the scaling is really exercised


# -- quantized exports -------------------------------------------------------------------------

@pytest.mark.parametrize("type", ["f16", "q8_0"])
def test_quantized_greedy_agrees_with_ours(llama_cpp, ours, type):
    agree = [_their_greedy(llama_cpp[type], ids, 8) == c.token_ids[:8] for ids, c in zip(ours["ids"], ours["completions"])]
    assert sum(agree) >= 4, agree


def _perplexity(llm: Llama, tokenizer, rows) -> float:
    """Perplexity of the responses of `rows` given their prompts (what training put in the loss)."""
    nll, count = 0.0, 0
    tokenized, _ = tokenize_dataset(datasets.Dataset.from_list(rows), tokenizer, SEQ_LEN, add_bos=True)
    for row in tokenized:
        ids, mask = [int(t) for t in row["input_ids"]], np.asarray(row["loss_mask"], bool)
        logits = _their_logits(llm, ids)[:-1].astype(np.float64)
        log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        scored = mask[1:]
        nll -= log_probs[np.arange(len(ids) - 1), ids[1:]][scored].sum()
        count += int(scored.sum())
    return float(np.exp(nll / count))


def test_q8_0_perplexity_is_within_2_percent_of_f32(run, llama_cpp):
    tokenizer = load_tokenizer(run / "tokenizer")
    f32, q8_0, q4_0 = (_perplexity(llama_cpp[t], tokenizer, HELD_OUT_ROWS) for t in ("f32", "q8_0", "q4_0"))
    assert f32 < 10, f32  # the model predicts held-out answers (uniform would be 512)
    assert abs(q8_0 / f32 - 1) < 0.02, (f32, q8_0)
    assert q4_0 < 1.5 * f32, (f32, q4_0)  # 4 bits: coarser, still the same model


# -- tokenizers: llama.cpp encodes prompts as training did --------------------------------------

def _sentencepiece_tokenizer(directory: Path):
    """A LLaMA-style SentencePiece BPE (byte fallback, no normalization, a dummy prefix) trained
    here on the corpus, loaded by transformers as LLaMA's tokenizer is."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXTS), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, minloglevel=2)
    directory.mkdir(parents=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return LlamaTokenizer.from_pretrained(str(directory))


# LLaMA-3's pre-tokenizer regex, as in its tokenizer.json.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _llama3_style_tokenizer(directory: Path):
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(TRAIN_TEXTS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>")


@pytest.mark.parametrize("kind", ["run_bpe", "sentencepiece", "llama3"])
def test_llama_cpp_tokenizes_as_training(tmp_path, run, kind):
    if kind == "run_bpe":
        source = run
    else:
        make = _sentencepiece_tokenizer if kind == "sentencepiece" else _llama3_style_tokenizer
        tokenizer = make(tmp_path / "made")
        cfg = tiny_model(vocab_size=512, max_position_embeddings=256)
        source = _save_run(tmp_path / "run", cfg, random_params(cfg), tokenizer)
    tokenizer = load_tokenizer(source / "tokenizer")  # as training loads it
    vocab = Llama(str(export_gguf(source, tmp_path / "vocab.gguf", type="f32")), vocab_only=True, verbose=False)
    for row, expected in zip(ROWS, _training_prompt_ids(tokenizer)):
        prompt = alpaca_prompt(row["instruction"], row["input"])
        assert vocab.tokenize(prompt.encode(), add_bos=True, special=False) == expected
    for text in (TRICKY, TRAIN_TEXTS[-1]):
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == \
            tokenizer(text, add_special_tokens=False)["input_ids"]
    assert vocab.token_bos() == tokenizer.bos_token_id and vocab.token_eos() == tokenizer.eos_token_id


# -- chat --------------------------------------------------------------------------------------

def test_create_chat_completion_prompts_as_training(run, llama_cpp, ours):
    """llama-cpp-python renders the exported chat template and tokenizes it: the ids it feeds
    the model are training's prompt, and greedy decoding then writes our answer."""
    seen = []

    def record(input_ids, scores):
        seen.append(list(input_ids))
        return scores
    reply = llama_cpp["f32"].create_chat_completion(
        messages=[{"role": "user", "content": ROWS[0]["instruction"]}], max_tokens=NEW_TOKENS, temperature=0.0,
        repeat_penalty=1.0, logits_processor=LogitsProcessorList([record]))
    assert seen[0] == _training_prompt_ids(load_tokenizer(run / "tokenizer"))[0] == ours["ids"][0]
    assert reply["choices"][0]["message"]["content"] == ours["completions"][0].text


# -- LoRA --------------------------------------------------------------------------------------

def test_gguf_lora_adapter_on_the_base_equals_the_merged_model(tmp_path, run, ours):
    lora = LoraConfig(rank=8, alpha=16.0, target_modules=("q", "k", "v", "o", "down"))
    model_cfg = dataclasses.replace(tiny_model(**SHAPE), init_from=str(run))
    rng = np.random.default_rng(5)
    adapters = jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32),
                            adapter_shapes(model_cfg, lora))
    lora_run = _save_run(tmp_path / "lora-run", model_cfg, adapters, load_tokenizer(run / "tokenizer"), lora=lora)
    files = {mode: export_gguf(lora_run, tmp_path / f"{mode}.gguf", type="f32", lora=mode)
             for mode in ("base", "adapter", "merge")}
    ids = ours["ids"][1]
    options = dict(n_ctx=256, n_threads=1, logits_all=True, verbose=False, **F32_CACHE)
    with_adapter = _their_logits(Llama(str(files["base"]), lora_path=str(files["adapter"]), **options), ids)
    merged = _their_logits(Llama(str(files["merge"]), **options), ids)
    base = _their_logits(Llama(str(files["base"]), **options), ids)
    assert np.abs(merged - base).max() > 0.5  # the adapters change the model
    np.testing.assert_array_less(np.abs(with_adapter - merged).max(), 1e-3)


def test_a_failed_export_leaves_no_file(tmp_path, run, monkeypatch):
    """A write that fails part-way (here: the disk fills at the third tensor) removes its
    partial file; the previous OUT, if any, is left as it was."""
    from alpaca_jax.gguf_export import export as module
    (tmp_path / "out.gguf").write_bytes(b"an older export")
    calls = []

    def failing(array, qtype):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return module_encode(array, qtype)
    module_encode = module.encode
    monkeypatch.setattr(module, "encode", failing)
    with pytest.raises(OSError, match="No space left"):
        export_gguf(run, tmp_path / "out.gguf", type="f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]
    assert (tmp_path / "out.gguf").read_bytes() == b"an older export"
