"""lm-evaluation-harness on our JAX backend against lm-eval's own `hf` backend (PyTorch,
transformers) on our HF export of the same tiny run: the same requests (few-shot, --limit), the
same per-request log-likelihoods, generations and metrics, for a multiple-choice, a
`generate_until` and a `loglikelihood_rolling` task over local JSONL files (tests/eval/lm_eval_tasks)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lm_eval.models.huggingface import HFLM

from alpaca_jax.cli import main
from alpaca_jax.eval.harness import run_tasks
from alpaca_jax.eval.lm_eval_backend import AlpacaJaxLM
from alpaca_jax.eval.tasks import load_tasks
from alpaca_jax.hf import export_hf
from alpaca_jax.infer import load_model
from helpers import make_tiny_run

DATA = Path(__file__).with_name("lm_eval_tasks")
TASKS = ["ajx_mc", "ajx_gen", "ajx_text"]
FEWSHOT, LIMIT, BATCH = 2, 20, 32


def write_tasks(folder: Path) -> Path:
    """Task YAMLs over the local JSONL files (lm-eval reads data_files relative to the working
    directory, so the paths are written absolute)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = "dataset_path: json\ndataset_kwargs:\n  data_files:\n"
    (folder / "mc.yaml").write_text(
        f"task: ajx_mc\n{source}    train: {DATA}/mc_train.jsonl\n    test: {DATA}/mc.jsonl\n"
        "test_split: test\nfewshot_split: train\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "gen.yaml").write_text(
        f"task: ajx_gen\n{source}    train: {DATA}/gen_train.jsonl\n    test: {DATA}/gen.jsonl\n"
        "test_split: test\nfewshot_split: train\noutput_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: " {{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", "Q:"]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")
    (folder / "text.yaml").write_text(
        f"task: ajx_text\n{source}    test: {DATA}/text.jsonl\n"
        'test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    run = make_tiny_run(root / "run")
    return {"run": run, "hf": export_hf(run, root / "hf"), "tasks": write_tasks(root / "tasks")}


@pytest.fixture(scope="module")
def both(setup):
    """Every task on both backends: 2-shot, the first 20 documents of each."""
    manager = load_tasks(TASKS, setup["tasks"])
    ours = AlpacaJaxLM(load_model(setup["run"]), batch_size=BATCH)
    reference = HFLM(pretrained=str(setup["hf"]), backend="causal", batch_size=BATCH, device="cpu",
                     dtype=torch.float32)
    kwargs = dict(manager=manager, num_fewshot=FEWSHOT, limit=LIMIT)
    with _network_watch() as attempts:
        results = {"ours": run_tasks(ours, TASKS, **kwargs), "hf": run_tasks(reference, TASKS, **kwargs)}
    return {**results, "tokenizer": reference.tokenizer, "network": attempts}


@contextlib.contextmanager
def _network_watch():
    """Every address a socket tries to reach (refused, so nothing leaves the machine)."""
    attempts = []

    def refuse(address):
        attempts.append(address)
        raise OSError(f"network access during an offline task run: {address}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", lambda sock, address: refuse(address))
        patch.setattr(socket.socket, "connect_ex", lambda sock, address: refuse(address))
        patch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: refuse(host))
        yield attempts


def test_tasks_run_offline(both):
    assert both["network"] == []  # lm-eval read the local files only, on both backends


def _samples(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def _metrics(results, task):
    return {k: v for k, v in results["results"][task].items() if k != "alias"}


def test_fewshot_and_limit_give_the_same_requests(both):
    for task in TASKS:
        ours, theirs = _samples(both["ours"], task), _samples(both["hf"], task)
        assert [s["arguments"] for s in ours] == [s["arguments"] for s in theirs], task
    mc = _samples(both["ours"], "ajx_mc")
    assert len(mc) == LIMIT == len(_samples(both["ours"], "ajx_gen"))
    # Each context holds the 2 shots and the question; every choice of a document is a request.
    assert all(s["arguments"][0][0].count("Question:") == FEWSHOT + 1 for s in mc)
    assert sum(len(s["arguments"]) for s in mc) == 4 * LIMIT


def test_multiple_choice_loglikelihoods_and_accuracy_equal_the_hf_backend(both):
    ours, theirs = _samples(both["ours"], "ajx_mc"), _samples(both["hf"], "ajx_mc")
    ours_ll = np.array([r[0][0] for s in ours for r in s["resps"]])
    theirs_ll = np.array([r[0][0] for s in theirs for r in s["resps"]])
    assert len(ours_ll) == 4 * LIMIT and np.abs(theirs_ll).min() > 1.0  # scores of a clear scale
    np.testing.assert_allclose(ours_ll, theirs_ll, rtol=0, atol=1e-4)
    assert [r[0][1] for s in ours for r in s["resps"]] == [r[0][1] for s in theirs for r in s["resps"]]
    # Multi-token continuations go through the shared-context path, one-token ones do not.
    lengths = {len(both["tokenizer"](" " + c, add_special_tokens=False)["input_ids"])
               for s in ours for c in s["doc"]["choices"]}
    assert 1 in lengths and max(lengths) > 1
    assert _metrics(both["ours"], "ajx_mc") == _metrics(both["hf"], "ajx_mc")  # acc, acc_norm, stderrs
    assert 0 < both["ours"]["results"]["ajx_mc"]["acc,none"] < 1


def test_generations_and_exact_match_equal_the_hf_backend(both):
    ours, theirs = _samples(both["ours"], "ajx_gen"), _samples(both["hf"], "ajx_gen")
    assert [s["resps"] for s in ours] == [s["resps"] for s in theirs]
    assert sum(bool(s["resps"][0][0].strip()) for s in ours) >= LIMIT // 2  # real text, not all empty
    assert _metrics(both["ours"], "ajx_gen") == _metrics(both["hf"], "ajx_gen")


def test_rolling_loglikelihoods_equal_the_hf_backend(both, setup):
    ours, theirs = _samples(both["ours"], "ajx_text"), _samples(both["hf"], "ajx_text")
    ours_ll = np.array([s["resps"][0][0] for s in ours])
    theirs_ll = np.array([s["resps"][0][0] for s in theirs])
    # Totals over up to ~500 tokens, summed in fp32 on both sides: 1e-4 absolute, or a relative
    # 1e-6 where the sum exceeds 100 (float32's spacing at 1024 is 1.2e-4).
    np.testing.assert_allclose(ours_ll, theirs_ll, rtol=1e-6, atol=1e-4)
    lengths = [len(both["tokenizer"](s["doc"]["text"])["input_ids"]) for s in ours]
    assert max(lengths) > load_model(setup["run"]).max_len  # some texts span several windows
    for key, value in _metrics(both["hf"], "ajx_text").items():
        if isinstance(value, float):
            assert _metrics(both["ours"], "ajx_text")[key] == pytest.approx(value, rel=1e-5), key


def test_cli_puts_task_metrics_with_stderr_in_the_results(setup, both, tmp_path, capsys):
    code = main(["eval", str(setup["run"]), "--tasks", "ajx_mc", "--include-path", str(setup["tasks"]),
                 "--num-fewshot", str(FEWSHOT), "--limit", "8", "--batch-size", str(BATCH), "-o", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "results.json").read_text())
    acc = results["runs"][0]["tasks"]["ajx_mc"]["acc"]
    expected = [s["acc"] for s in _samples(both["hf"], "ajx_mc")[:8]]  # the hf backend's per-document scores
    assert acc["value"] == pytest.approx(np.mean(expected))
    assert acc["stderr"] == pytest.approx(np.std(expected, ddof=1) / np.sqrt(8))
    assert results["tasks"] == {"names": ["ajx_mc"], "include_path": str(setup["tasks"]), "num_fewshot": FEWSHOT,
                                "limit": 8, "apply_chat_template": False}
    table = (tmp_path / "results.md").read_text()
    assert "ajx_mc acc (± stderr)" in table and f"{acc['value']:.4f} ± {acc['stderr']:.4f}" in table


def test_chat_template_prompts_equal_the_exported_template(setup, both):
    """With apply_chat_template, our prompts (the run's template as `chat` renders it) tokenize to
    the ids the `hf` backend gets from the exported tokenizer's Jinja template, and score alike.
    Zero shots: the exported Alpaca template takes one user turn."""
    manager = load_tasks(["ajx_mc"], setup["tasks"])
    ours_lm = AlpacaJaxLM(load_model(setup["run"]), batch_size=BATCH)
    hf_lm = HFLM(pretrained=str(setup["hf"]), backend="causal", batch_size=BATCH, device="cpu", dtype=torch.float32)
    kwargs = dict(manager=manager, num_fewshot=0, limit=6, apply_chat_template=True)
    ours = _samples(run_tasks(ours_lm, ["ajx_mc"], **kwargs), "ajx_mc")
    theirs = _samples(run_tasks(hf_lm, ["ajx_mc"], **kwargs), "ajx_mc")
    assert all(s["arguments"][0][0].startswith("Below is an instruction") for s in ours)
    assert [ours_lm.tok_encode(s["arguments"][0][0]) for s in ours] == \
        [hf_lm.tok_encode(s["arguments"][0][0]) for s in theirs]
    np.testing.assert_allclose([r[0][0] for s in ours for r in s["resps"]],
                               [r[0][0] for s in theirs for r in s["resps"]], rtol=0, atol=1e-4)


def test_scores_on_the_training_mesh_equal_one_device(setup, tmp_path):
    """A run trained on fsdp=2 x tensor=2 is evaluated on that mesh (4 fake devices): same scores."""
    run = Path(shutil.copytree(setup["run"], tmp_path / "run"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["mesh"].update(data=1, fsdp=2, tensor=2)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    worker = Path(__file__).with_name("lm_eval_mesh_worker.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join([str(worker.parents[2]), str(worker.parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(worker), str(run)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2} and report["wq_devices"] == 4
    np.testing.assert_allclose([s[0] for s in report["sharded"]], [s[0] for s in report["single"]], rtol=0, atol=1e-4)
    assert [s[1] for s in report["sharded"]] == [s[1] for s in report["single"]]
