"""An export prompts and stops as training did, and chats in `transformers serve`.

The exported tokenizer adds BOS exactly when the run's examples began with one, its chat
template renders the Alpaca prompt training used (ids compared with `tokenize_dataset`), its
generation config stops at EOS, and `transformers serve` (the OpenAI-compatible server in
transformers, offline) serves a tiny export to the real `openai` client and to our generator.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import datasets
import jax
import jinja2
import numpy as np
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alpaca_jax import hf
from alpaca_jax.checkpoint import save_params
from alpaca_jax.config import Config, TokenizerConfig, save_config
from alpaca_jax.data.templates import alpaca_prompt
from alpaca_jax.data.tokenize import tokenize_dataset
from alpaca_jax.data.tokenizer import train_bpe_tokenizer
from alpaca_jax.model import param_shapes
from helpers import tiny_model

REPO = Path(__file__).resolve().parents[1]
ROWS = [  # no input, an input, a whitespace-only input (the with-input template, as alpaca_prompt)
    {"instruction": "Add 4 and 5.", "input": "", "output": "9"},
    {"instruction": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3"},
    {"instruction": "Name a colour.", "input": "  ", "output": "Blue."},
]
SERVER_START_S = 180  # model load + uvicorn start on a busy 2-core machine; the test fails past it


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[bool, Path]:
    """Exports of one tiny random model whose run added BOS (True) or did not (False)."""
    root = tmp_path_factory.mktemp("chat")
    texts = [alpaca_prompt(f"Add {i} and {i + 1}.", f"{i}, {i + 1}" * (i % 2)) + f"{2 * i + 1}"
             for i in range(300)]
    tokenizer = train_bpe_tokenizer(texts, 512, 2)
    model = tiny_model(vocab_size=512, num_layers=2)
    rng = np.random.default_rng(0)

    def randomise(path, x):  # norm scales near 1, other weights small: varied but finite logits
        is_norm = jax.tree_util.keystr(path).endswith("['scale']")
        return (float(is_norm) + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
    params = jax.tree_util.tree_map_with_path(randomise, param_shapes(model))
    out = {}
    for add_bos in (True, False):
        run = root / f"run_bos_{add_bos}"
        save_params(run, params)
        tokenizer.save_pretrained(str(run / "tokenizer"))
        save_config(Config(model=model, tokenizer=TokenizerConfig(add_bos=add_bos)), run / "config.yaml")
        out[add_bos] = hf.export_hf(run, root / f"hf_bos_{add_bos}")
    return out


def _training_prompt_ids(tokenizer_dir: Path, add_bos: bool) -> list[list[int]]:
    """The prompt part (loss mask off) of each row's ids as training built them."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    tokenized, _ = tokenize_dataset(datasets.Dataset.from_list(ROWS), tokenizer, 512, add_bos=add_bos)
    return [[int(t) for t, m in zip(row["input_ids"], row["loss_mask"]) if not m] for row in tokenized]


@pytest.mark.parametrize("add_bos", [True, False])
def test_exported_tokenizer_encodes_prompts_as_training_did(exports, add_bos):
    out = exports[add_bos]
    training = _training_prompt_ids(out.parent / f"run_bos_{add_bos}" / "tokenizer", add_bos)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    for row, expected in zip(ROWS, training):
        assert (expected[0] == tokenizer.bos_token_id) == add_bos
        assert tokenizer(alpaca_prompt(row["instruction"], row["input"]))["input_ids"] == expected
        chat = tokenizer.apply_chat_template([{"role": "user", "content": row["instruction"]}],
                                             add_generation_prompt=True, return_dict=False,
                                             input=row["input"])
        assert chat == expected
    config = json.loads((out / "tokenizer_config.json").read_text())
    # A class name transformers 4.x resolves too (5.x writes TokenizersBackend, which 4.x lacks).
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["add_bos_token"] == add_bos


_ENCODE_IN_OTHER_TRANSFORMERS = """
import json, sys
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True)
rows, prompts = json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(json.dumps([[tokenizer(p)["input_ids"], tokenizer.apply_chat_template(
    [{"role": "user", "content": r["instruction"]}], add_generation_prompt=True, tokenize=True,
    return_dict=False, input=r["input"])] for r, p in zip(rows, prompts)]))
"""


@pytest.mark.skipif(not os.environ.get("ALPACA_JAX_TRANSFORMERS4_PYTHON"),
                    reason="set ALPACA_JAX_TRANSFORMERS4_PYTHON to a Python with transformers 4.x "
                           "(pip install 'transformers<5' tokenizers jinja2; no torch needed)")
@pytest.mark.parametrize("add_bos", [True, False])
def test_exported_tokenizer_encodes_alike_in_transformers_4(exports, add_bos):
    out = exports[add_bos]
    prompts = [alpaca_prompt(r["instruction"], r["input"]) for r in ROWS]
    python = os.environ["ALPACA_JAX_TRANSFORMERS4_PYTHON"]
    result = subprocess.run([python, "-c", _ENCODE_IN_OTHER_TRANSFORMERS, str(out), json.dumps(ROWS),
                             json.dumps(prompts)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = _training_prompt_ids(out.parent / f"run_bos_{add_bos}" / "tokenizer", add_bos)
    assert json.loads(result.stdout.splitlines()[-1]) == [[ids, ids] for ids in expected]


def test_chat_template_renders_whole_examples_and_refuses_other_shapes(exports):
    tokenizer = AutoTokenizer.from_pretrained(exports[True], local_files_only=True)
    row = ROWS[1]
    example = tokenizer.apply_chat_template(
        [{"role": "user", "content": row["instruction"]},
         {"role": "assistant", "content": row["output"]}], tokenize=False, input=row["input"])
    assert example == "<s>" + alpaca_prompt(row["instruction"], row["input"]) + row["output"] + "</s>"
    # A system message in the preamble's place; content parts as `transformers serve` passes them.
    with_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Answer in one word."},
         {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]}],
        tokenize=False, add_generation_prompt=True)
    assert with_system == "<s>Answer in one word.\n\n### Instruction:\nName a colour.\n\n### Response:"
    for messages in ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}],
                     [{"role": "system", "content": "a"}],
                     [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]):
        with pytest.raises(jinja2.TemplateError, match="single-turn Alpaca prompts"):
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_plain_generate_stops_at_eos(exports, tmp_path):
    out = shutil.copytree(exports[True], tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    assert eos == AutoTokenizer.from_pretrained(out, local_files_only=True).eos_token_id
    assert model.generation_config.pad_token_id is not None and not model.generation_config.do_sample
    # Make EOS the greedy choice: embedding column 0 dominates the residual stream, so its
    # normalised value is positive, and only the EOS row of the head reads it.
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 100.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos, 0] = 1.0
    prompt = torch.tensor([[1, 40, 41, 42]])
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8)
    assert generated[0, 4:].tolist() == [eos]  # ended at EOS with no stop token passed to generate


# -- transformers serve -----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(exports, tmp_path_factory):
    """`transformers serve` pinned to the BOS export, offline; (base_url, model name)."""
    model_dir, port = str(exports[True]), _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    # The `transformers` console script of this interpreter's environment, as a user runs it.
    command = [str(Path(sys.executable).with_name("transformers")), "serve", model_dir,
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"transformers serve exited with {process.returncode}:\n"
                            f"{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve not ready in {SERVER_START_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", model_dir
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_served_export_chats_as_generate_does(server, exports):
    base_url, model_name = server
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": ROWS[0]["instruction"]}]
    chat = client.chat.completions.create(model=model_name, messages=messages, max_tokens=12, temperature=0)
    completion = client.completions.create(model=model_name, prompt=alpaca_prompt(ROWS[0]["instruction"]),
                                           max_tokens=12, temperature=0)

    tokenizer = AutoTokenizer.from_pretrained(model_name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_name, local_files_only=True).eval()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    expected = tokenizer.decode(generated, skip_special_tokens=True)

    assert chat.usage.prompt_tokens == prompt["input_ids"].shape[1] == len(_training_prompt_ids(
        exports[True].parent / "run_bos_True" / "tokenizer", True)[0])
    assert chat.choices[0].message.content == expected and chat.usage.completion_tokens == len(generated)
    # /v1/completions tokenizes the raw prompt with the BOS the tokenizer now adds: the same ids.
    assert completion.usage.prompt_tokens == chat.usage.prompt_tokens
    assert completion.choices[0].text == expected


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_generator_completes_requests_against_the_served_export(server, tmp_path, monkeypatch, api):
    from data_gen.config import load_config
    from data_gen.generate import generate
    base_url, model_name = server
    monkeypatch.setenv("OPENAI_API_KEY", "unused-by-a-local-server")
    config = load_config(REPO / "configs/generate/alpaca.yaml", [
        f"teacher.base_url={base_url}", f"teacher.model={model_name}", f"teacher.api={api}",
        "sampling.instructions.max_tokens=8", "teacher.max_retries=0", "teacher.max_concurrency=2",
        "pipeline.requests_per_round=2", "pipeline.max_rounds=1", "pipeline.num_instructions=1",
        f"output.dir={tmp_path / 'out'}", "output.progress=false"])
    report = generate(config)
    assert report["this_run"]["sent"] == 2 and report["this_run"]["completed"] == 2
    assert report["this_run"]["failed"] == 0 and report["this_run"]["errors"] == {}
    assert report["tokens"]["prompt"] > 0 and report["tokens"]["completion"] > 0
