"""Decoding: the KV cache against recomputing everything, batches against single prompts,
sampling settings, stop strings, streaming, limits."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alpaca_jax.config import RopeScalingConfig
from alpaca_jax.infer import (DecodeBatch, LoadedModel, PromptTooLongError, Row, SamplingConfig, TextTracker,
                              decode_rows, format_alpaca_prompt, generate, load_model, sampling_mask)
from alpaca_jax.model import Llama
from helpers import random_params, tiny_model

VARIANTS = {
    "mha": dict(num_heads=4, num_kv_heads=4),
    # GQA with the LLaMA-3 features: rope scaling, head_dim != D / N, tied embeddings, and
    # unrolled layers (the per-layer cache path)
    "gqa-llama3": dict(num_heads=4, num_kv_heads=2, head_dim=12, rope_theta=500000.0, tie_embeddings=True,
                       rope_scaling=RopeScalingConfig(original_max_position_embeddings=16), scan_layers=False),
}


def _recompute_greedy(cfg, params, prompts: list[list[int]], steps: int, width: int = 32) -> list[list[int]]:
    """Greedy decoding without a cache: the whole sequence through the training forward pass at
    every step (right-padded to one width, a separate segment id for padding)."""
    forward = jax.jit(Llama(cfg).apply)
    out = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(steps):
            ids = np.zeros((1, width), np.int32)
            ids[0, :len(seq)] = seq
            segments = (np.arange(width) < len(seq)).astype(np.int32)[None]
            logits = forward({"params": params}, jnp.asarray(ids), jnp.arange(width)[None], jnp.asarray(segments))
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        out.append(seq[len(prompt):])
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_decoding_equals_recomputing(tiny_model_loaded, variant):
    cfg = tiny_model(vocab_size=512, max_position_embeddings=192, **VARIANTS[variant])
    params = random_params(cfg, seed=3)
    model = dataclasses.replace(tiny_model_loaded, config=cfg, params=jax.device_put(params))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(4, 512, n)) for n in (5, 13, 9)]  # different lengths, one batch
    # EOS never ends a row here: the comparison is over every step.
    model = dataclasses.replace(model, tokenizer=_NoEos(model.tokenizer))
    steps = 12
    cached = decode_rows(model, [Row(p, SamplingConfig(max_new_tokens=steps)) for p in prompts])
    expected = _recompute_greedy(cfg, params, prompts, steps)
    assert [c.token_ids for c in cached] == expected
    assert all(c.finish_reason == "length" for c in cached)
    assert len({tuple(t) for t in expected}) == 3  # the rows really differ


class _NoEos:
    """A tokenizer whose EOS id is out of the vocabulary (so it is never sampled)."""
    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id, self.pad_token_id = 10_000, 0

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


# Short prompts of different lengths within one length bucket: each test here reuses the same
# compiled prefill/decode shapes (compiling is most of the cost on a busy CPU).
PROMPTS = ["The sum of 1", "Add 3 and 4. Café", "東京", "Café, naïve"]


@pytest.mark.parametrize("sampling", [SamplingConfig(max_new_tokens=10),
                                      SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7)],
                         ids=["greedy", "sampled"])
def test_batch_gives_each_prompt_its_solo_result(tiny_model_loaded, sampling):
    batched = generate(tiny_model_loaded, PROMPTS, sampling, batch_size=4)
    solo = [generate(tiny_model_loaded, [p], sampling)[0] for p in PROMPTS]
    assert [c.token_ids for c in batched] == [c.token_ids for c in solo]
    assert [c.text for c in batched] == [c.text for c in solo]
    assert all(c.prompt_tokens == len(tiny_model_loaded.encode(p)) for c, p in zip(batched, PROMPTS))


def test_rows_joining_mid_decode_get_their_solo_results(tiny_model_loaded):
    """Continuous batching: rows admitted while another decodes (into a batch and a cache that
    then grow: 1 -> 2 -> 4 slots, 64 -> 128 -> 192 positions) decode exactly as they do alone."""
    model = dataclasses.replace(tiny_model_loaded, tokenizer=_NoEos(tiny_model_loaded.tokenizer))
    long = SamplingConfig(max_new_tokens=150)
    encode = tiny_model_loaded.encode
    rows = {"first": Row(encode(PROMPTS[0]), long),
            "second": Row(encode(PROMPTS[1]), SamplingConfig(max_new_tokens=40)),
            "third": Row(encode(PROMPTS[2]), SamplingConfig(max_new_tokens=60, temperature=1.0, seed=3)),
            "fourth": Row(encode(PROMPTS[3]), long)}
    solo = {name: decode_rows(model, [row])[0] for name, row in rows.items()}
    batch, done, steps = DecodeBatch(model, max_batch=4), {}, 0
    batch.admit([rows["first"]])
    while len(done) < len(rows):
        if steps == 30:
            batch.admit([rows["second"]])
        if steps == 70:
            batch.admit([rows["third"], rows["fourth"]])
        done.update((next(n for n, r in rows.items() if r is row), c) for row, c in batch.step())
        steps += 1
    assert {n: c.token_ids for n, c in done.items()} == {n: c.token_ids for n, c in solo.items()}
    assert {n: c.text for n, c in done.items()} == {n: c.text for n, c in solo.items()}
    assert len(done["first"].token_ids) == 150 and steps > 200  # the cache grew past two buckets
    assert batch.live == 0 and batch.free == 4


def test_seed_changes_sampled_text_and_greedy_ignores_it(tiny_model_loaded):
    prompt = [PROMPTS[1]]
    sample = lambda **kw: generate(tiny_model_loaded, prompt, SamplingConfig(max_new_tokens=10, **kw))[0].token_ids
    assert sample(temperature=1.5, seed=1) == sample(temperature=1.5, seed=1)
    assert sample(temperature=1.5, seed=1) != sample(temperature=1.5, seed=2)
    assert sample(seed=1) == sample(seed=2)
    assert sample(temperature=1.5, top_k=1, seed=1) == sample()  # top-1 sampling is greedy


def test_sampling_mask_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4))
    mask = sampling_mask(logits, jnp.asarray([0, 2, 0, 3]), jnp.asarray([1.0, 1.0, 0.7, 0.5]))
    assert np.asarray(mask).tolist() == [[True] * 4, [True, True, False, False],
                                         [True, True, False, False], [True, False, False, False]]


def test_stop_strings_and_streaming(tiny_model_loaded):
    tokenizer = tiny_model_loaded.tokenizer
    text = "The sum of 2 and 3 is 5. Café, naïve, 東京."
    for stop, expected in (((), text), (("naïve",), "The sum of 2 and 3 is 5. Café, "), (("3", "sum"), "The ")):
        tracker = TextTracker(tokenizer, stop)
        pieces = []
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            pieces.append(tracker.add(token))
            if tracker.stopped:
                break
        pieces.append(tracker.finish())
        assert tracker.text == expected and "".join(pieces) == expected
        assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_generate_stops_at_stop_string_and_streams_the_same_text(tiny_model_loaded):
    prompt = tiny_model_loaded.encode(PROMPTS[0])
    free = decode_rows(tiny_model_loaded, [Row(prompt, SamplingConfig(max_new_tokens=10))])[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    stop = free.text[len(free.text) // 2:][:2]
    pieces = []
    stopped = decode_rows(tiny_model_loaded, [Row(prompt, SamplingConfig(max_new_tokens=10, stop=(stop,)),
                                                  on_text=pieces.append)])[0]
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:free.text.find(stop)]
    assert "".join(pieces) == stopped.text


def test_context_limits(tiny_model_loaded):
    model = tiny_model_loaded
    with pytest.raises(PromptTooLongError, match="context is 192"):
        generate(model, ["Café " * 200])
    ids = list(np.random.default_rng(0).integers(4, 512, model.max_len - 3))
    done = decode_rows(model, [Row(ids, SamplingConfig(max_new_tokens=50))])[0]
    assert len(ids) + len(done.token_ids) <= model.max_len  # at most 3 tokens: the context is full
    assert done.finish_reason == "stop" or len(done.token_ids) == 3


def test_load_model_from_run_checkpoint_and_hf(tmp_path, tiny_run):
    from alpaca_jax.hf import export_hf
    run = load_model(tiny_run)
    hf = load_model(export_hf(tiny_run, tmp_path / "hf"))
    assert run.name == "tiny-run" and run.add_bos and hf.add_bos and run.max_len == hf.max_len == 192
    assert run.config == dataclasses.replace(hf.config, preset=run.config.preset)
    sampling = SamplingConfig(max_new_tokens=10)
    assert generate(run, PROMPTS[:1], sampling)[0].token_ids == generate(hf, PROMPTS[:1], sampling)[0].token_ids


def test_decoding_with_params_on_a_training_mesh(tiny_run):
    """Params placed by the training rules on fsdp=2 x tensor=2 (4 fake devices): same tokens."""
    worker = Path(__file__).with_name("mesh_decode_worker.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join([str(worker.parents[2]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(worker), str(tiny_run)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["sharded"] == report["single"]
    assert report["wq_devices"] == 4 and report["wq_shard"][0] < 32  # embed really split (fsdp)
    # Unsharded params with 4 devices visible: the fused kernel runs whole on the one device
    # (it used to fall back to xla: "no mesh layout was given for the 4 devices").
    assert abs(report["fused_loss"] - report["plain_loss"]) <= 1e-5 * abs(report["plain_loss"])
    assert report["fused_choices"] and all(m.startswith("attention: pallas_flash") for m in report["fused_choices"]), \
        report["fused_choices"]
