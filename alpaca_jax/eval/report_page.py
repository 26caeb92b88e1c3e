"""OUT_DIR/index.html: the eval results as one self-contained page to read, not parse.

The results table; per instruction every run's answer side by side with the reference, the
judge's two verdicts (each answer shown first once) with its full replies (its reasoning);
filters by category, by verdict and a text search; the loss curves of the evaluated runs. The
data sits in the page as JSON in a <script type="application/json"> tag and the page's own
script (alpaca_jax/web/report.html, no library) draws it, so the file opens offline, can be
mailed or archived, and asks no other host for anything.

An instruction's outcome for a run is the score of its valid judgments (stats.SCORE: win 1,
tie 1/2, loss 0) averaged: above 1/2 a win, below a loss, exactly 1/2 a tie, the rule the win
rate uses. It is position-inconsistent when its two verdicts name different winners.

Not here: the numbers (stats.py, runner.py), drawing the curves (loss_curves.py).
"""

from __future__ import annotations

import importlib.resources
import json
import os
from pathlib import Path

from alpaca_jax.eval.dataset import EvalItem
from alpaca_jax.eval.loss_curves import COLORS, Curve, curves_from_metrics, loss_curves_svg
from alpaca_jax.eval.stats import SCORE, PairVerdicts

__all__ = ["outcome", "metrics_source", "report_data", "render_report", "write_report_page", "REPORT_FILE"]

REPORT_FILE = "index.html"
_DATA_MARK = "/*REPORT_DATA*/"
_CURVES_MARK = "<!--LOSS_CURVES-->"


def outcome(pair: PairVerdicts) -> str | None:
    """"win", "loss" or "tie" for the run under test; None when the judge gave no verdict."""
    judged = pair.judgments
    if not judged:
        return None
    score = sum(SCORE[v] for v in judged) / len(judged)
    return "win" if score > 0.5 else "loss" if score < 0.5 else "tie"


def inconsistent(pair: PairVerdicts) -> bool:
    return pair.x_first is not None and pair.y_first is not None and pair.x_first != pair.y_first


def metrics_source(source: str | Path) -> tuple[Path, int | None] | None:
    """(the run directory whose metrics.jsonl describes `source`, the last step that applies)
    for a run directory or one of its checkpoints; None for anything else."""
    path = Path(source)
    if (path / "metrics.jsonl").is_file():
        return path, None
    if path.parent.name == "checkpoints" and (path.parent.parent / "metrics.jsonl").is_file() and path.name.isdigit():
        return path.parent.parent, int(path.name)  # the checkpoint saw the steps up to its own
    return None


def run_curves(runs: list[dict]) -> list[Curve]:
    """The loss curves of the result rows whose source is a training run."""
    curves = []
    for row in runs:
        found = metrics_source(row["source"])
        if found is None:
            continue
        # Here, not at the top: alpaca_jax.train imports JAX, which judging outputs files never needs.
        from alpaca_jax.train.metrics import read_metrics
        run_dir, last_step = found
        records = [r for r in read_metrics(run_dir) if last_step is None or r.get("step", 0) <= last_step]
        curves.append(curves_from_metrics(row["name"], records))
    return curves


def report_data(results: dict, items: list[EvalItem], outputs: list[list[str]],
                verdicts: dict[str, list[PairVerdicts]]) -> dict:
    """What the page shows, JSON-ready: `verdicts` maps a judged run's name to its
    PairVerdicts against the baseline, one per item."""
    names = [row["name"] for row in results["runs"]]
    rows = []
    for i, item in enumerate(items):
        judgments = {}
        for name, pairs in verdicts.items():
            pair = pairs[i]
            judgments[name] = {"outcome": outcome(pair), "inconsistent": inconsistent(pair),
                               "x_first": pair.x_first, "y_first": pair.y_first,
                               "x_first_reply": pair.x_first_reply, "y_first_reply": pair.y_first_reply}
        rows.append({"index": i, "instruction": item.instruction, "input": item.input, "category": item.category,
                     "reference": item.reference, "answers": {n: outputs[k][i] for k, n in enumerate(names)},
                     "judgments": judgments})
    return {"data": results["data"], "instructions": results["instructions"], "baseline": results.get("baseline"),
            "judge": results.get("judge"), "skipped": results.get("skipped", {}), "colors": list(COLORS),
            "runs": [{key: row.get(key) for key in ("name", "source", "perplexity", "rouge_l", "mean_output_words",
                                                    "judge")} for row in results["runs"]],
            "items": rows}


def _script_json(data: dict) -> str:
    """JSON that cannot end its <script> element early (no '<', '>' or '&' left as such)."""
    text = json.dumps(data, ensure_ascii=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def render_report(data: dict, curves: list[Curve]) -> str:
    template = (importlib.resources.files("alpaca_jax") / "web" / "report.html").read_text(encoding="utf-8")
    svg = loss_curves_svg(curves) or '<p class="note">No training metrics (metrics.jsonl) for these runs.</p>'
    return template.replace(_DATA_MARK, _script_json(data)).replace(_CURVES_MARK, svg)


def write_report_page(out_dir: str | Path, results: dict, items: list[EvalItem], outputs: list[list[str]],
                      verdicts: dict[str, list[PairVerdicts]]) -> Path:
    path = Path(out_dir) / REPORT_FILE
    page = render_report(report_data(results, items, outputs, verdicts), run_curves(results["runs"]))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
