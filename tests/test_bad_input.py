"""Bad input through the real CLI, one table row per case: every subcommand must stop with
exactly one line `error: ...` on stderr naming the key, file, line or path, exit with the
documented code (2 unless the row says otherwise), print no traceback, and leave no file
behind that a later run could trip on.

Adding a case is adding a `Row`. In `argv`, `says` and `cwd`, `{tmp}` is the row's own empty
folder (filled from `files` first) and `{ro}` a folder nobody can write to, root included: the
tests run as root, where chmod stops nothing, so `{ro}` is `/sys/kernel` (sysfs refuses file
creation to every user). The rows run 3 at a time, since each CLI process mostly waits on its
imports; a row that fails before JAX is imported costs well under a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import REPO

READ_ONLY = Path("/sys/kernel")
LATIN1 = "Caf\u00e9".encode("latin-1")  # b"Caf\xe9": not UTF-8
HF_CONFIG = json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 97,
                        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2})
# An import-hf output as far as export-hf's checks look (the weights are never reached).
IMPORTED = {"src/params/.keep": "", "src/config.yaml": yaml.safe_dump({"model": {"preset": "tiny"}})}
GENERATE = str(REPO / "alpaca_jax" / "configs" / "generate" / "alpaca.yaml")
CURATE = str(REPO / "alpaca_jax" / "configs" / "generate" / "curate.yaml")
COMMITTEE = "teachers:\n  - {name: a, base_url: 'http://127.0.0.1:9/v1'}\ncommittee:\n  assign: per_stage\n  stages: {instances: b}\n"
ROW = '{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}\n'
TASK_YAML = ("task: ok_task\ndataset_path: json\ndataset_kwargs: {data_files: {test: rows.jsonl}}\n"
             "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_target: '{{text}}'\n")


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    argv: tuple[str, ...]              # after `alpaca-jax`
    says: tuple[str, ...]              # what the one line must contain
    code: int = 2
    files: dict = dataclasses.field(default_factory=dict)  # {relative path: str or bytes} in {tmp}
    cwd: str = "{tmp}"
    env: dict = dataclasses.field(default_factory=dict)


ROWS = [
    # -- train ----------------------------------------------------------------------------------
    Row("train-unknown-key", ("train", "train.bogus=1"), ("train.bogus",)),
    Row("train-wrong-type", ("train", "train.batch_size=abc"), ("train.batch_size", "abc")),
    Row("train-missing-config", ("train", "{tmp}/nope.yaml"), ("{tmp}/nope.yaml",)),
    Row("train-invalid-yaml", ("train", "{tmp}/bad.yaml"), ("{tmp}/bad.yaml:2",),
        files={"bad.yaml": "train:\n  seed: 0: 1\n"}),
    Row("train-config-not-utf8", ("train", "{tmp}/latin1.yaml"), ("{tmp}/latin1.yaml:2", "UTF-8"),
        files={"latin1.yaml": b"train:\n  seed: 0  # " + LATIN1 + b"\n"}),
    Row("train-override-syntax", ("train", "{tmp}/ok.yaml", "train.seed"), ("train.seed", "section.field=value"),
        files={"ok.yaml": "train:\n  seed: 0\n"}),
    Row("train-unknown-preset", ("train", "model.preset=llama-99b"), ("model.preset", "llama-99b")),
    Row("train-batch-vs-grad-accum", ("train", "train.batch_size=6", "train.grad_accum=4"),
        ("train.batch_size (6)", "train.grad_accum (4)")),
    Row("train-read-only-run-dir", ("train", "run.dir={ro}/run"), ("run.dir", "{ro}/run")),
    Row("train-read-only-working-dir", ("train",), ("run.dir", "runs/tiny", "{ro}"), cwd="{ro}"),
    Row("train-run-dir-under-a-file", ("train", "run.dir={tmp}/blocker/run"),
        ("run.dir", "{tmp}/blocker", "not a directory"), files={"blocker": "a file"}),
    Row("train-checkpoints-not-writable", ("train", "run.dir={tmp}/run"),
        ("checkpoint directory", "{tmp}/run/checkpoints"), files={"run/checkpoints": "a file"}),
    Row("train-data-latin1-file", ("train", "data.train_files=[{tmp}/latin1.json]", "run.dir={tmp}/run"),
        ("{tmp}/latin1.json:1", "UTF-8"),
        files={"latin1.json": b'[{"instruction": "' + LATIN1 + b'", "output": "x"}]\n'}),
    Row("train-data-one-latin1-byte", ("train", "data.train_files=[{tmp}/data.jsonl]", "run.dir={tmp}/run"),
        ("{tmp}/data.jsonl:3", "UTF-8"),
        files={"data.jsonl": (ROW + ROW).encode() + b'{"instruction": "' + LATIN1 + b'", "output": "x"}\n'}),
    Row("train-batch-vs-mesh", ("train", "mesh.data=2", "train.batch_size=3", "run.dir={tmp}/run"),
        ("train.batch_size (3)", "2 data-parallel devices"),
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}),
    Row("train-dpo-beta", ("train", "preference.beta=0"), ("preference.beta",)),
    Row("train-dpo-pair-without-rejected", ("train", "preference.beta=0.1", "data.train_files=[{tmp}/pairs.jsonl]",
                                            "data.on_malformed=error", "run.dir={tmp}/run"),
        ("{tmp}/pairs.jsonl:2", "no 'rejected'"),
        files={"pairs.jsonl": '{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}\n'
                              '{"prompt": "Hi?", "chosen": "Hello."}\n'}),
    Row("train-dpo-chosen-equals-rejected", ("train", "preference.beta=0.1", "data.train_files=[{tmp}/pairs.jsonl]",
                                             "data.on_malformed=error", "run.dir={tmp}/run"),
        ("{tmp}/pairs.jsonl:1", "chosen equals rejected"),
        files={"pairs.jsonl": '{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hello."}\n'}),
    Row("train-dpo-no-response-within-max-len", ("train", "preference.beta=0.1", "data.max_len=8",
                                                 "data.train_files=[{tmp}/pairs.jsonl]", "run.dir={tmp}/run"),
        ("no preference pair", "data.max_len=8"),
        files={"pairs.jsonl": '{"prompt": "Say hello to everyone here.", "chosen": "Hello.", "rejected": "Go."}\n'}),
    Row("eval-neither-data-nor-safety", ("eval", "{tmp}/x.json", "-o", "{tmp}/out"), ("--data", "--safety")),
    Row("eval-safety-without-judge", ("eval", "{tmp}/x.json", "--safety", "{tmp}/s.jsonl", "-o", "{tmp}/out"),
        ("--safety needs --judge",), files={"x.json": "[]", "s.jsonl": '{"instruction": "Hi?", "label": "safe"}\n'}),
    Row("eval-safety-bad-label", ("eval", "{tmp}/x.json", "--safety", "{tmp}/s.jsonl", "-o", "{tmp}/out",
                                  "--judge", "{tmp}/j.yaml"),
        ("{tmp}/s.jsonl:1", "label"), files={"x.json": "[]", "s.jsonl": '{"instruction": "Hi?", "label": "ok"}\n',
                                             "j.yaml": "judge: {model: m}\n"}),
    # -- plan -----------------------------------------------------------------------------------
    Row("plan-device-memory", ("plan", "--device-memory", "80XB"), ("80XB",)),
    Row("plan-devices", ("plan", "--devices", "0"), ("--devices",)),
    Row("plan-unknown-key", ("plan", "mesh.bogus=1"), ("mesh.bogus",)),
    Row("plan-batch-vs-mesh", ("plan", "mesh.fsdp=8", "train.batch_size=4", "--devices", "8"),
        ("train.batch_size (4)", "8 data-parallel devices")),
    # -- export-hf ------------------------------------------------------------------------------
    Row("export-missing-source", ("export-hf", "{tmp}/none", "{tmp}/out"), ("{tmp}/none",)),
    Row("export-read-only-out", ("export-hf", "{tmp}/src", "{ro}/out"), ("OUT_DIR", "{ro}/out"), files=IMPORTED),
    Row("export-out-under-a-file", ("export-hf", "{tmp}/src", "{tmp}/blocker/out"),
        ("OUT_DIR", "{tmp}/blocker", "not a directory"), files={**IMPORTED, "blocker": "a file"}),
    Row("export-shard-size", ("export-hf", "{tmp}/src", "{tmp}/out", "--max-shard-size", "5XB"), ("5XB",),
        files=IMPORTED),
    Row("export-not-a-run", ("export-hf", "{tmp}/empty", "{tmp}/out"), ("{tmp}/empty", "not a run directory"),
        files={"empty/.keep": ""}),
    # -- export-gguf ----------------------------------------------------------------------------
    Row("export-gguf-unknown-type", ("export-gguf", "{tmp}/src", "{tmp}/out.gguf", "--type", "q5_k"),
        ("--type", "q5_k", "q8_0"), files=IMPORTED),
    Row("export-gguf-not-llama", ("export-gguf", "{tmp}/hf", "{tmp}/out.gguf"),
        ("{tmp}/hf/config.json", "model_type 'gpt2'", "not a LLaMA"),
        files={"hf/config.json": json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})}),
    Row("export-gguf-read-only-out", ("export-gguf", "{tmp}/src", "{ro}/out.gguf"), ("OUT", "{ro}/out.gguf"),
        files=IMPORTED),
    # -- import-hf ------------------------------------------------------------------------------
    Row("import-no-config-json", ("import-hf", "{tmp}", "{tmp}/out"), ("{tmp}", "no config.json")),
    Row("import-read-only-out", ("import-hf", "{tmp}/hf", "{ro}/out"), ("OUT", "{ro}/out"),
        files={"hf/config.json": HF_CONFIG}),
    Row("import-out-exists", ("import-hf", "{tmp}/hf", "{tmp}/out"), ("{tmp}/out/params", "already exists"),
        files={"hf/config.json": HF_CONFIG, "out/params/.keep": ""}),
    Row("import-config-not-utf8", ("import-hf", "{tmp}/hf", "{tmp}/out"), ("{tmp}/hf/config.json:1", "UTF-8"),
        files={"hf/config.json": b'{"model_type": "' + LATIN1 + b'"}'}),
    # -- generate -------------------------------------------------------------------------------
    Row("generate-unknown-key", ("generate", GENERATE, "teacher.bogus=1"), ("teacher.bogus",)),
    Row("generate-read-only-output", ("generate", GENERATE, "output.dir={ro}/gen"), ("output.dir", "{ro}/gen")),
    Row("generate-journal-bad-middle-line", ("generate", GENERATE, "output.dir={tmp}/gen"),
        ("{tmp}/gen/journal.jsonl:1", "only the last line"),
        files={"gen/journal.jsonl": 'garbage\n{"id": "a", "text": "paid for"}\n'}),
    Row("generate-seeds-not-utf8", ("generate", GENERATE, "pipeline.seed_tasks={tmp}/seeds.jsonl",
                                    "output.dir={tmp}/gen"), ("{tmp}/seeds.jsonl:2", "UTF-8"),
        files={"seeds.jsonl": b'{"instruction": "a", "instances": [{"input": "", "output": "b"}]}\n'
                              b'{"instruction": "' + LATIN1 + b'", "instances": [{"input": "", "output": "b"}]}\n'}),
    Row("generate-committee-unknown-teacher", ("generate", "{tmp}/c.yaml", "output.dir={tmp}/gen"),
        ("committee.stages.instances", "'b'"), files={"c.yaml": COMMITTEE}),
    Row("generate-unknown-teacher-mode", ("generate", GENERATE, "teacher.mode=offline"), ("teacher.mode", "offline")),
    # -- curate ---------------------------------------------------------------------------------
    Row("curate-missing-data", ("curate", "{tmp}/nope.json", "-o", "{tmp}/out.json", "--judge", CURATE),
        ("{tmp}/nope.json",)),
    Row("curate-min-score-out-of-range", ("curate", "{tmp}/in.jsonl", "-o", "{tmp}/out.json", "--judge", CURATE,
                                          "--min-score", "7"), ("--min-score", "7"), files={"in.jsonl": ROW}),
    Row("curate-row-without-output", ("curate", "{tmp}/in.jsonl", "-o", "{tmp}/out.json", "--judge", CURATE),
        ("{tmp}/in.jsonl", "row 2", "output"), files={"in.jsonl": ROW + '{"instruction": "x"}\n'}),
    Row("curate-unknown-judge-key", ("curate", "{tmp}/in.jsonl", "-o", "{tmp}/out.json", "--judge", CURATE,
                                     "judge.bogus=1"), ("judge.bogus",), files={"in.jsonl": ROW}),
    # -- dedup ----------------------------------------------------------------------------------
    Row("dedup-not-utf8", ("dedup", "{tmp}/in.jsonl", "-o", "{tmp}/out.jsonl"), ("{tmp}/in.jsonl:3", "UTF-8"),
        files={"in.jsonl": (ROW + ROW).encode() + b'{"instruction": "' + LATIN1 + b'"}\n'}),
    Row("dedup-malformed-json", ("dedup", "{tmp}/in.jsonl", "-o", "{tmp}/out.jsonl"), ("{tmp}/in.jsonl:2",),
        files={"in.jsonl": ROW + "{not json\n"}),
    Row("dedup-missing-field", ("dedup", "{tmp}/in.jsonl", "-o", "{tmp}/out.jsonl"),
        ("{tmp}/in.jsonl:3", "instruction"), files={"in.jsonl": ROW + "\n" + '{"text": "x"}\n'}),
    Row("dedup-read-only-output", ("dedup", "{tmp}/in.jsonl", "-o", "{ro}/out.jsonl"), ("-o", "{ro}/out.jsonl"),
        files={"in.jsonl": ROW}),
    Row("dedup-output-is-a-dir", ("dedup", "{tmp}/in.jsonl", "-o", "{tmp}"), ("-o", "{tmp}", "is a directory"),
        files={"in.jsonl": ROW}),
    # -- export-peft ----------------------------------------------------------------------------
    Row("export-peft-not-lora", ("export-peft", "{tmp}/src", "{tmp}/out"), ("{tmp}/src", "not a LoRA run"),
        files=IMPORTED),
    Row("export-peft-read-only-out", ("export-peft", "{tmp}/src", "{ro}/out"), ("OUT_DIR", "{ro}/out"),
        files=IMPORTED),
    # -- chat, respond, serve (a model directory is checked before anything loads) ---------------
    Row("chat-missing-model", ("chat", "{tmp}/none"), ("model directory not found", "{tmp}/none")),
    Row("respond-missing-model", ("respond", "{tmp}/none", "--input", "{tmp}/in.jsonl", "-o", "{tmp}/out.jsonl"),
        ("model directory not found", "{tmp}/none"), files={"in.jsonl": ROW}),
    Row("respond-read-only-output", ("respond", "{tmp}/src", "--input", "{tmp}/in.jsonl", "-o", "{ro}/out.jsonl"),
        ("-o/--output", "{ro}/out.jsonl"), files={**IMPORTED, "in.jsonl": ROW}),
    Row("respond-input-not-utf8", ("respond", "{tmp}/src", "--input", "{tmp}/in.jsonl", "-o", "{tmp}/out.jsonl"),
        ("{tmp}/in.jsonl:2", "UTF-8"), files={**IMPORTED, "in.jsonl": ROW.encode() + b'{"instruction": "' + LATIN1 + b'"}\n'}),
    Row("respond-missing-input", ("respond", "{tmp}/src", "--input", "{tmp}/none.jsonl", "-o", "{tmp}/out.jsonl"),
        ("{tmp}/none.jsonl", "not found"), files=IMPORTED),
    Row("respond-output-bad-middle-line", ("respond", "{tmp}/src", "--input", "{tmp}/in.jsonl", "-o", "{tmp}/out.jsonl"),
        ("{tmp}/out.jsonl:1", "only the last line"),
        files={**IMPORTED, "in.jsonl": ROW, "out.jsonl": 'garbage\n{"index": 0, "instruction": "Add the numbers."}\n'}),
    Row("serve-missing-model", ("serve", "{tmp}/none"), ("model directory not found", "{tmp}/none")),
    Row("serve-api-key-unset", ("serve", "{tmp}/src", "--api-key-env", "ALPACA_JAX_TEST_UNSET_KEY"),
        ("--api-key-env", "ALPACA_JAX_TEST_UNSET_KEY"), files=IMPORTED),
    # -- eval -----------------------------------------------------------------------------------
    Row("eval-missing-run", ("eval", "{tmp}/none", "--data", "{tmp}/in.jsonl", "-o", "{tmp}/out"),
        ("run not found", "{tmp}/none"), files={"in.jsonl": ROW}),
    Row("eval-read-only-out", ("eval", "{tmp}/src", "--data", "{tmp}/in.jsonl", "-o", "{ro}/out"),
        ("-o/--out", "{ro}/out"), files={**IMPORTED, "in.jsonl": ROW}),
    Row("eval-unknown-task", ("eval", "{tmp}/src", "--tasks", "no_such_task", "--include-path", "{tmp}/tasks",
                              "-o", "{tmp}/out"), ("unknown task", "no_such_task", "{tmp}/tasks"),
        files={**IMPORTED, "tasks/ok.yaml": TASK_YAML}),
    Row("eval-task-file-does-not-parse", ("eval", "{tmp}/src", "--tasks", "ok_task", "--include-path", "{tmp}/tasks",
                                          "-o", "{tmp}/out"), ("{tmp}/tasks/bad.yaml", "does not parse"),
        files={**IMPORTED, "tasks/ok.yaml": TASK_YAML, "tasks/bad.yaml": "task: bad\n  dataset_path: [json\n"}),
    Row("eval-tasks-missing-run", ("eval", "{tmp}/none", "--tasks", "ok_task", "--include-path", "{tmp}/tasks",
                                   "-o", "{tmp}/out"), ("run not found", "{tmp}/none"),
        files={"tasks/ok.yaml": TASK_YAML}),
    Row("eval-nothing-to-evaluate", ("eval", "{tmp}/src", "-o", "{tmp}/out"), ("--data", "--tasks"), files=IMPORTED),
    # -- config ---------------------------------------------------------------------------------
    Row("config-unknown-key", ("config", "model.bogus=1"), ("model.bogus",)),
    Row("config-wrong-literal", ("config", "model.remat=some"), ("model.remat", "some")),
    Row("config-missing-file", ("config", "{tmp}/nope.yaml"), ("{tmp}/nope.yaml",)),
    # -- recipe ---------------------------------------------------------------------------------
    Row("recipe-unknown-stage", ("recipe", "{tmp}/r.yaml"), ("unknown stage 'distill'", "generate, dedup"),
        files={"r.yaml": "dir: r\ndistill: {}\n"}),
    Row("recipe-unknown-stage-listed", ("recipe", "{tmp}/r.yaml", "stages=[dedup,bogus]"), ("unknown stage 'bogus'", "stages"),
        files={"r.yaml": "dir: r\ndedup: {input: x.json}\n"}),
    Row("recipe-stage-config-error", ("recipe", "{tmp}/r.yaml", "train.optimizer.learning_rate=fast"),
        ("stage 'train'", "optimizer.learning_rate", "fast"),
        files={"r.yaml": "dir: r\ndedup: {input: in.jsonl}\ntrain: {}\n", "in.jsonl": ROW}),
    Row("recipe-stage-unknown-key", ("recipe", "{tmp}/r.yaml", "--status"), ("stage 'dedup'", "dedup.thresold"),
        files={"r.yaml": "dir: r\ndedup: {input: in.jsonl, thresold: 0.5}\n", "in.jsonl": ROW}),
    Row("recipe-from-missing-input", ("recipe", "{tmp}/r.yaml", "--from", "train"),
        ("--from train", "stage 'train' input 'data'", "stage 'dedup' has not finished"),
        files={"r.yaml": "dir: r\ndedup: {input: in.jsonl}\ntrain: {}\n", "in.jsonl": ROW}),
    Row("recipe-curate-min-score", ("recipe", "{tmp}/r.yaml", "--status"), ("stage 'curate'", "curate.min_score"),
        files={"r.yaml": "dir: r\ncurate: {input: r.json, min_score: 9}\n"}),
    Row("recipe-preference-without-section", ("recipe", "{tmp}/r.yaml", "--status"),
        ("stage 'preference'", "preference.preference"),
        files={"r.yaml": "dir: r\ndedup: {input: in.jsonl}\ntrain: {}\npreference: {data: {train_files: [p.jsonl]}}\n",
               "in.jsonl": ROW}),
]


def _expand(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{ro}", str(READ_ONLY))


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes (folders themselves are not files a
    later run could trip on: an empty run directory is a fine place to start again)."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(row: Row, tmp: Path) -> dict:
    tmp.mkdir(parents=True)
    for name, content in row.files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = _snapshot(tmp)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENAI_API_KEY": "unused", **row.env}
    proc = subprocess.run([sys.executable, "-m", "alpaca_jax.cli", *(_expand(a, tmp) for a in row.argv)],
                          cwd=_expand(row.cwd, tmp), env=env, capture_output=True, text=True, timeout=300)
    return {"code": proc.returncode, "stderr": proc.stderr, "before": before, "after": _snapshot(tmp)}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, request) -> dict[str, dict]:
    if not READ_ONLY.is_dir():
        pytest.skip(f"{READ_ONLY} is absent: the rows need a folder no user can write to (Linux sysfs)")
    root = tmp_path_factory.mktemp("bad_input")
    # Only the rows pytest selected (`-k train-` runs those), all at once.
    selected = {item.callspec.params["row"].id for item in request.session.items
                if item.module is request.module and "row" in getattr(getattr(item, "callspec", None), "params", {})}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {row.id: pool.submit(_run, row, root / row.id) for row in ROWS if row.id in selected}
        return {name: {**future.result(), "tmp": root / name} for name, future in futures.items()}


def test_the_table_covers_every_subcommand():
    from alpaca_jax.cli import _parser
    commands = set(_parser()._subparsers._group_actions[0].choices)
    assert commands <= {row.argv[0] for row in ROWS}, "add rows for the new subcommands"
    assert len(ROWS) >= 30 and len({row.id for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_stops_with_one_line(outcomes, row):
    out = outcomes[row.id]
    lines = out["stderr"].splitlines()
    assert out["code"] == row.code, out["stderr"][-3000:]
    assert "Traceback" not in out["stderr"]
    assert len(lines) == 1 and lines[0].startswith("error: "), out["stderr"][-3000:]
    for words in row.says:
        assert _expand(words, out["tmp"]) in lines[0], lines[0]
    assert out["after"] == out["before"], "files were left behind or changed"
