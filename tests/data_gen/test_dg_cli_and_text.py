"""The `dedup` and `generate` commands, shipped configs, filters, parsers and non-English text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_gen.cli import main
from data_gen.config import FilterConfig, DedupConfig, load_config
from data_gen.filters import instance_drop_reason, instruction_drop_reason
from data_gen.gate import InstructionGate
from data_gen.prompts import parse_alpaca_response, parse_bootstrap_response, parse_instances
from data_gen.report import Report

REPO = Path(__file__).resolve().parents[2]


def test_dedup_command_keeps_the_first_in_file_order(tmp_path):
    records = [{"instruction": "Give three tips for staying healthy.", "id": 0},
               {"instruction": "Give 3 tips for staying healthy!", "id": 1},
               {"instruction": "Translate the sentence into French.", "id": 2},
               {"instruction": "give three tips for staying healthy", "id": 3}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["dedup", str(src), "-o", str(tmp_path / "out.jsonl")]) == 0
    kept = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert kept == [0, 2]
    array = tmp_path / "in.json"
    array.write_text(json.dumps(records))
    assert main(["dedup", str(array), "-o", str(tmp_path / "out.json"), "--threshold", "0.95"]) == 0
    assert [r["id"] for r in json.loads((tmp_path / "out.json").read_text())] == [0, 1, 2]


def test_usage_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["dedup", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o")]) == 2
    assert main(["dedup", __file__, "-o", str(tmp_path / "o"), "--threshold", "2"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  modle: x\n")
    assert main(["generate", str(bad)]) == 2
    assert main(["generate", str(REPO / "configs/generate/alpaca.yaml"), "dedup.threshold=3"]) == 2
    assert main(["generate", str(REPO / "configs/generate/self_instruct.yaml"), "sampling.instances.top_p=0"]) == 2
    assert main(["generate", str(REPO / "configs/generate/alpaca.yaml"), "pipeline.max_idle_rounds=0"]) == 2
    assert main(["generate", str(REPO / "configs/generate/alpaca.yaml"), "budget.max_requests=0"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 7 and all(line.startswith("error: ") for line in errors)
    assert "teacher.modle" in errors[2]
    assert [k in line for k, line in zip(("sampling.instances.top_p", "pipeline.max_idle_rounds",
                                          "budget.max_requests"), errors[4:])] == [True] * 3


def test_shipped_configs_load_and_document_every_key():
    for name in ("alpaca", "self_instruct", "safety"):
        path = REPO / "configs/generate" / f"{name}.yaml"
        overrides = ["pipeline.unsafe_instructions=unsafe.jsonl"] if name == "safety" else []
        config = load_config(path, overrides)
        assert config.pipeline.name == {"alpaca": "alpaca", "self_instruct": "self-instruct", "safety": "safety"}[name]
        for line in path.read_text().splitlines():
            if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
                assert "#" in line, f"undocumented key in {name}.yaml: {line}"


def test_filters_name_every_reason():
    config = FilterConfig()
    cases = {"Do it now": "too_short", "word " * 151: "too_long",
             "Describe the image in one sentence.": "blacklisted_keyword",
             "Write a program to sort a list.": "banned_prefix",
             "\"Quote\" this sentence for me.": "punctuation_start",
             "Évaluez la phrase suivante.": "non_ascii_start",
             "Explain what a mapping is in math.": None}  # whole words only: 'mapping' != 'map'
    for text, reason in cases.items():
        assert instruction_drop_reason(text, config) == reason, text
    assert instruction_drop_reason("Describe the image in one sentence.", FilterConfig(blacklist=())) is None
    assert instance_drop_reason("x", "", config) == "empty_output"
    assert instance_drop_reason("same", "same", config) == "input_equals_output"
    assert instance_drop_reason("", "The list is:", config) == "truncated"


def test_parsers_recover_tasks_and_count_the_rest():
    reply = (" Name a fruit.\n4. Input:\n<noinput>\n4. Output:\nApple.\n###\n5. Instruction: garbled\n###\n"
             "6. Instruction: Add the numbers.\n6. Input:\n2, 3\n6. Output:\n5\n###\n7. Instruction: Cut")
    parsed = parse_alpaca_response(reply, 3, "length")
    assert parsed.items == [("Name a fruit.", "", "Apple."), ("Add the numbers.", "2, 3", "5")]
    assert parsed.unparseable == 1 and parsed.truncated == 1
    boot = parse_bootstrap_response(" First task here\n10. Second task here\n11. Third", "stop")
    assert boot.items == ["First task here", "Second task here", "Third"]
    clf = parse_instances("Class label: Yes\nInput: a\nClass label: No\nInput: b", True, "stop")
    assert clf.items == [("a", "Yes"), ("b", "No")]
    gen = parse_instances("Example 1\nInput: x\nOutput: y\nExample 2\nOutput: z", False, "stop")
    assert gen.items == [("x", "y"), ("", "z")]


def test_chinese_text_goes_through_filters_and_dedup(shared_data):
    records = json.loads((shared_data / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    texts = [r["instruction"] for r in records]
    filters = FilterConfig(drop_non_ascii_start=False, min_words=1)
    ascii_report, unicode_report = Report("alpaca"), Report("alpaca")
    ascii_gate = InstructionGate(filters, DedupConfig(tokenizer="rouge"), ascii_report)
    unicode_gate = InstructionGate(filters, DedupConfig(tokenizer="unicode"), unicode_report)
    for text in texts + texts[:50]:  # the repeats must be caught either way
        ascii_gate.admit(text)
        unicode_gate.admit(text)
    coverage = ascii_report.to_dict({}, {}, {})["ascii_tokenizer"]
    # rouge-score's tokenizer sees almost nothing of Chinese: most texts have no token at all.
    assert coverage["texts_with_no_comparable_token"] > 0.5 * len(texts)
    assert coverage["letters_ignored_fraction"] > 0.9
    assert ascii_report.dropped["exact_duplicate"] >= 50
    # The Unicode tokenizer compares them, so it also finds near-duplicates ROUGE-ASCII cannot.
    assert unicode_report.dropped["exact_duplicate"] + unicode_report.dropped["near_duplicate"] >= 50
    # ASCII ROUGE is blind to Chinese both ways: two sentences one character apart score 0, and
    # sentences that share only a Latin word ("Python") look identical. Unicode gets both right.
    from data_gen.dedup import deduplicate
    pair = ["请解释一下机器学习中的过拟合现象。", "请解释一下机器学习中的欠拟合现象。"]
    assert deduplicate(pair, tokenizer="rouge").dropped == []
    assert deduplicate(pair, tokenizer="unicode").dropped == [1]
    latin = ["用Python写一个快速排序。", "用Python计算两个日期之间的天数。"]
    assert deduplicate(latin, tokenizer="rouge").dropped == [1]
    assert deduplicate(latin, tokenizer="unicode").dropped == []
    # With the default English filters the data is counted, not crashed on.
    default = Report("alpaca")
    gate = InstructionGate(FilterConfig(), DedupConfig(), default)
    assert sum(gate.admit(t) for t in texts) < len(texts) and default.dropped["too_short"] > 0
