"""Every figure in BENCHMARKS.md's tables is read from a benchmark's JSON in benchmarks/results/
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


def test_every_table_figure_in_benchmarks_md_is_in_its_json():
    problems = figures.unsourced_figures((REPO / "BENCHMARKS.md").read_text(encoding="utf-8"),
                                         REPO / "benchmarks" / "results")
    assert not problems, "\n".join(map(str, problems))


def test_the_check_catches_a_typed_figure_and_accepts_displayed_roundings(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"ours": {"tokens_per_second": 597.3, "efficiency": 0.9461},
                                                    "step_s": 0.8561, "ratio": 1.6049, "kept": 31653}))
    text = "\n".join([
        "## A section",
        "`python benchmarks/x.py` (`benchmarks/results/run.json`)",
        "",
        "| measure | ours | ratio | target |",
        "|---|---|---|---|",
        "| tokens/s on `[8, 512]` | 597 | **1.60x** | >= 2x |",   # rounded displays, exempt target
        "| efficiency | 94.6% | | |",                              # a fraction shown as a percentage
        "| step | 856 ms | | |",                                   # seconds shown as milliseconds
        "| kept | 31,653 | | |",                                    # thousands separator
        "| typed by hand | 0.99 | 612 | |",
        "",
        "## Another section",
        "| no source named | 597 |",
        "|---|---|",
        "| x | 597 |",
    ])
    problems = figures.unsourced_figures(text, tmp_path)
    assert [(p.line, p.figure) for p in problems] == [(10, "0.99"), (10, "612"), (15, "597")]
    assert "run.json" in str(problems[0]) and "no benchmarks/results" in str(problems[2])
