"""Every figure in BENCHMARKS.md's tables displays the value at one key path of a benchmark's JSON in
benchmarks/results/, and every ratio README.md quotes is tagged with, and matches, its key path
(the convention and the checker are in benchmarks/figures.py)."""

from __future__ import annotations

import importlib.util
import json
import sys

from conftest import REPO

_spec = importlib.util.spec_from_file_location("figures", REPO / "benchmarks" / "figures.py")
figures = importlib.util.module_from_spec(_spec)
sys.modules["figures"] = figures  # dataclasses look their module up there
_spec.loader.exec_module(figures)

RESULTS = REPO / "benchmarks" / "results"


def _where(problems):
    return [(p.line, p.figure) for p in problems]


def test_every_table_figure_in_benchmarks_md_is_at_its_key_path():
    problems = figures.table_problems((REPO / "BENCHMARKS.md").read_text(encoding="utf-8"), RESULTS)
    assert not problems, "\n".join(map(str, problems))


def test_every_ratio_quoted_in_readme_is_tagged_and_matches_its_json():
    problems = figures.prose_problems((REPO / "README.md").read_text(encoding="utf-8"), RESULTS)
    assert not problems, "\n".join(map(str, problems))


def _run_json(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({
        "ours": {"tokens_per_second": 597.3, "efficiency": 0.9461}, "step_s": 0.8561, "kept": 31653,
        "rows": [{"name": "a", "ratio": 1.6049}, {"name": "b", "ratio": 2.4849}],
        "decode": {"llama.cpp f16, 2 threads": {"bytes": 2362232012}}}))


def test_the_check_catches_a_typed_figure_and_accepts_displayed_roundings(tmp_path):
    _run_json(tmp_path)
    text = "\n".join([
        "| measure | ours | ratio | target |",
        "|---|---|---|---|",
        "| tokens/s on `[8, 512]` | 597 | **1.60x** | >= 2x |",   # rounded displays, exempt target
        "| efficiency | 94.6% | | |",                              # a fraction shown as a percentage
        "| step | 856 ms | | |",                                   # seconds shown as milliseconds
        "| kept | 31,653 | 2.2 GiB | |",                           # thousands separator; bytes as GiB
        "| typed by hand | 0.99 | 2.50 | |",                       # 0.99 is not 0.9461; 2.50 is not 2.4849
        "",
        "<!-- figures: results/run.json",
        "ours.tokens_per_second, rows.0.ratio",
        "ours.efficiency",
        "step_s",
        'kept, decode."llama.cpp f16, 2 threads".bytes',
        "ours.efficiency, run.json:rows.1.ratio",
        "-->",
    ])
    problems = figures.table_problems(text, tmp_path)
    assert _where(problems) == [(7, "0.99"), (7, "2.50")]
    assert "run.json: ours.efficiency = 0.9461" in str(problems[0])


def test_swapping_two_rows_ratios_in_benchmarks_md_is_caught():
    """Both ratios are numbers of generation.json, so a check against *any* number in the file
    passes the swap; the key-path check does not."""
    lines = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8").splitlines()
    tiny_1 = next(i for i, line in enumerate(lines) if line.startswith("| tiny (1.3M params) | 1 |"))
    tiny_16 = next(i for i, line in enumerate(lines) if line.startswith("| tiny | 16 |"))
    assert "| 5.21x |" in lines[tiny_1] and "| 2.19x |" in lines[tiny_16]
    lines[tiny_1] = lines[tiny_1].replace("| 5.21x |", "| 2.19x |")
    lines[tiny_16] = lines[tiny_16].replace("| 2.19x |", "| 5.21x |")
    problems = figures.table_problems("\n".join(lines), RESULTS)
    assert _where(problems) == [(tiny_1 + 1, "2.19"), (tiny_16 + 1, "5.21")]
    assert "decode.tiny.batch_1.ratio" in str(problems[0])


def test_an_unmapped_figure_or_a_missing_key_path_is_reported(tmp_path):
    _run_json(tmp_path)
    text = "\n".join([
        "| measure | ours | ratio |",
        "|---|---|---|",
        "| tokens/s | 597 | 1.60 |",          # the mapping lists one path for two figures
        "| kept | 31,653 | |",               # a path that is not in the file
        "",
        "<!-- figures: run.json",
        "ours.tokens_per_second",
        "kept_rows",
        "-->",
        "",
        "| no mapping | 597 |",
        "|---|---|",
        "| x | 597 |",
        "",
        "| rows | a |",
        "|---|---|",
        "| one | 597 |",
        "| two | 1.60 |",
        "<!-- figures: run.json",
        "ours.tokens_per_second",            # the second row has no line
        "-->",
        "",
        "| unclosed | a |",
        "|---|---|",
        "| one | 597 |",
        "<!-- figures: run.json",
        "ours.tokens_per_second",
        "",
        "| a later table is still checked | 597 |",
        "|---|---|",
        "| x | 597 |",
    ])
    problems = figures.table_problems(text, tmp_path)
    assert _where(problems) == [(3, "1.60"), (4, "31,653"), (13, "597"), (15, ""), (18, "1.60"),
                                (26, ""), (23, ""), (25, "597"), (31, "597")]
    assert "has no key path" in str(problems[0]) and "'kept_rows' is not a key path in run.json" in str(problems[1])
    assert "no <!-- figures" in str(problems[2]) and "has 2 rows but" in str(problems[3])


def test_a_readme_figure_that_disagrees_with_its_json_is_reported(tmp_path):
    _run_json(tmp_path)
    text = "\n".join([
        "Packing gives 1.60x the examples/s and 2.50x the tokens. <!-- fig: run.json: rows.0.ratio, rows.1.ratio -->",
        "Untagged: 3.1x faster.",
        "Named: 94.6% efficiency and 597 tokens/s. <!-- fig: 94.6% = run.json: ours.efficiency, 598 = ours.tokens_per_second -->",
        "A target is not a measurement: 2x. <!-- fig: - -->",
        "```",
        "echo 9.9x  # code is not prose",
        "```",
        "`4 x 2048`, and a tag quoted as code: `<!-- fig: FILE.json: key.path -->`",
    ])
    problems = figures.prose_problems(text, tmp_path)
    assert _where(problems) == [(1, "2.50x"), (2, "3.1x"), (3, "598")]
    assert "rows.1.ratio = 2.4849" in str(problems[0]) and "not tagged" in str(problems[1])


def test_a_changed_ratio_in_the_real_readme_is_reported():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.count("served 2.78x the requests/s") == 1
    problems = figures.prose_problems(text.replace("served 2.78x the requests/s", "served 2.87x the requests/s"), RESULTS)
    assert [p.figure for p in problems] == ["2.87x"]
    assert "speedup_committee_4_2_1_over.single_100ms" in str(problems[0])
