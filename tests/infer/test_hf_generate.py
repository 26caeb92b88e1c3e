"""Greedy decoding of an exported tiny model equals transformers' `generate(do_sample=False)`
(PyTorch CPU, its own KV cache) token for token."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from alpaca_jax.hf import export_hf
from alpaca_jax.infer import SamplingConfig, format_alpaca_prompt, generate

PROMPTS = ["The sum of 1", "Add 3 and 4. Café", "東京", format_alpaca_prompt("Add 3 and 4.")]


def test_greedy_matches_transformers_generate(tmp_path, tiny_run, tiny_model_loaded):
    hf_dir = export_hf(tiny_run, tmp_path / "hf")
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    steps = 20
    ours = generate(tiny_model_loaded, PROMPTS, SamplingConfig(max_new_tokens=steps), batch_size=4)
    eos = tiny_model_loaded.eos_id
    for prompt, completion in zip(PROMPTS, ours):
        ids = torch.tensor([tiny_model_loaded.encode(prompt)])
        with torch.no_grad():
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=steps, eos_token_id=eos, pad_token_id=eos)
        theirs = out[0, ids.shape[1]:].tolist()
        ended = completion.token_ids + ([eos] if completion.finish_reason == "stop" else [])
        assert ended == theirs, prompt
    assert len({tuple(c.token_ids) for c in ours}) == len(PROMPTS)
    assert np.mean([len(c.token_ids) for c in ours]) > 5  # long enough to exercise the cache
