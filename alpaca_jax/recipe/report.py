"""RECIPE_DIR/report.md: the data funnel, the cost, the loss curves (PNG) and the eval table.

Read from what the stages left behind (their manifests' summaries, the generator's
report.json, the training run's metrics.jsonl, the eval's results.md), so it can be redrawn
at any time and says "not run" for a stage that has not finished.

Not here: running anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from alpaca_jax.recipe.manifest import read_manifest

__all__ = ["write_report"]


def _summary(recipe_dir: Path, stage: str) -> dict | None:
    manifest = read_manifest(recipe_dir / stage)
    return manifest.get("summary") if manifest and manifest.get("status") == "done" else None


def _funnel(recipe_dir: Path, stages: tuple[str, ...]) -> list[str]:
    rows = ["| step | rows |", "|---|---|"]
    generate = _summary(recipe_dir, "generate") if "generate" in stages else None
    if generate is not None:
        rows.append(f"| generated (candidates from the teacher) | {generate['candidates']} |")
        dropped = ", ".join(f"{k}: {v}" for k, v in generate["dropped"].items()) or "none"
        rows.append(f"| kept by the generator's filters and dedup ({dropped} dropped) | {generate['kept']} |")
    for stage, label in (("dedup", "kept by dedup"), ("curate", "kept by curation")):
        summary = _summary(recipe_dir, stage) if stage in stages else None
        if summary is not None:
            rows.append(f"| {label} | {summary['kept']} |")
    return rows if len(rows) > 2 else ["(no data stage has finished)"]


def _cost(recipe_dir: Path, stages: tuple[str, ...]) -> list[str]:
    generate = _summary(recipe_dir, "generate") if "generate" in stages else None
    curate = _summary(recipe_dir, "curate") if "curate" in stages else None
    evaluation = _summary(recipe_dir, "eval") if "eval" in stages else None
    rows = ["| stage | cost (USD) |", "|---|---|"]
    if generate is not None:
        rows.append(f"| generate ({generate['tokens']} tokens) | {generate['cost_usd']:.4f} |")
    if curate is not None:  # tokens of every rating in the journal, replayed ones included
        rows.append(f"| curate judge ({curate['tokens']} tokens) | {curate['cost_usd']:.4f} |")
    if evaluation is not None:
        rows.append(f"| eval judge ({evaluation['judge_requests_sent']} requests) | "
                    f"{evaluation['judge_cost_usd']:.4f} |")
    return rows if len(rows) > 2 else ["(no paid stage has finished)"]


def _loss_plot(metrics: Path, png: Path) -> bool:
    if not metrics.is_file():
        return False
    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held_out = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return False
    # Imported here: matplotlib takes a second to load, and only a finished training needs it.
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    figure, axes = pyplot.subplots(figsize=(6, 3.5))
    axes.plot(*zip(*train), label="train loss")
    if held_out:
        axes.plot(*zip(*held_out), marker="o", label="held-out loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(png)
    pyplot.close(figure)
    return True


def write_report(recipe_dir: Path, stages: tuple[str, ...]) -> Path:
    recipe_dir = Path(recipe_dir)
    lines = ["# Recipe report", "", "## Stages", "", "| stage | status |", "|---|---|"]
    for stage in stages:
        manifest = read_manifest(recipe_dir / stage)
        lines.append(f"| {stage} | {manifest.get('status') if manifest else 'not run'} |")
    lines += ["", "## Data funnel", "", *_funnel(recipe_dir, stages), "", "## Cost", "",
              *_cost(recipe_dir, stages), "", "## Loss curves", ""]
    curves = [(stage, f"![{label} loss](loss_{stage}.png)")
              for stage, label in (("train", "training"), ("preference", "preference (DPO)")) if stage in stages]
    drawn = [line for stage, line in curves
             if _loss_plot(recipe_dir / stage / "run" / "metrics.jsonl", recipe_dir / f"loss_{stage}.png")]
    lines += drawn or ["(no training metrics yet)"]
    lines += ["", "## Eval", ""]
    results = recipe_dir / "eval" / "results.md"
    lines.append(results.read_text(encoding="utf-8").strip() if results.is_file() else "(eval has not run)")
    path = recipe_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
