"""The eval results as a Markdown table: one row per run, so ablations read side by side; each
lm-eval task metric (harness.py) is a column of its own, its value ± lm-eval's stderr."""

from __future__ import annotations

__all__ = ["markdown_table"]


def _num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _win(judge: dict | None) -> str:
    if not judge or judge.get("win_rate") is None:
        return "–"
    low, high = judge["win_rate_ci95"]
    return f"{100 * judge['win_rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def _task_columns(runs: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) pairs in the order lm-eval reported them, over all runs."""
    columns: list[tuple[str, str]] = []
    for run in runs:
        for task, metrics in (run.get("tasks") or {}).items():
            columns += [(task, m) for m in metrics if (task, m) not in columns]
    return columns


def _metric(run: dict, task: str, metric: str) -> str:
    entry = ((run.get("tasks") or {}).get(task) or {}).get(metric)
    if entry is None or entry["value"] is None:
        return "–"
    stderr = entry.get("stderr")
    return f"{entry['value']:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")


def _rate(value, interval) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}% [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _safety_lines(results: dict) -> list[str]:
    """The safety columns: refusal rate on unsafe prompts, over-refusal on safe ones (95% CI)."""
    lines = ["| run | refusal rate on unsafe (95% CI) | over-refusal on safe (95% CI) | no verdict |",
             "|---|---:|---:|---:|"]
    for run in results["runs"]:
        s = run.get("safety") or {}
        lines.append(f"| {run['name']} | {_rate(s.get('refusal_rate'), s.get('refusal_rate_ci95'))} "
                     f"| {_rate(s.get('over_refusal_rate'), s.get('over_refusal_rate_ci95'))} "
                     f"| {s.get('no_verdict', '–')} |")
    return lines


def markdown_table(results: dict) -> str:
    baseline = results.get("baseline")
    tasks = _task_columns(results["runs"])
    if results.get("data") is not None:
        title = f"# Evaluation on `{results['data']}` ({results['instructions']} instructions)"
    else:
        title = f"# Evaluation on lm-eval tasks: {', '.join(dict.fromkeys(t for t, _ in tasks)) or '–'}"
    lines = [title, ""]
    extra = "".join(f" {task} {metric} (± stderr) |" for task, metric in tasks)
    lines.append(f"| run | perplexity | ROUGE-L | win rate vs {baseline or '–'} (95% CI) | W / T / L "
                 f"| position consistency | mean answer words |{extra}")
    lines.append("|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(tasks))
    for run in results["runs"]:
        judge = run.get("judge")
        wtl = f"{judge['wins']} / {judge['ties']} / {judge['losses']}" if judge else "–"
        consistency = judge.get("position_consistency") if judge else None
        win = "baseline" if run["name"] == baseline else _win(judge)
        cells = "".join(f" {_metric(run, task, metric)} |" for task, metric in tasks)
        lines.append(f"| {run['name']} | {_num(run.get('perplexity'), '.3f')} "
                     f"| {_num(run.get('rouge_l'), '.4f')} | {win} | {wtl} "
                     f"| {'–' if consistency is None else f'{100 * consistency:.1f}%'} "
                     f"| {_num(run.get('mean_output_words'), '.1f')} |{cells}")
    if any(run.get("safety") for run in results["runs"]):
        lines += ["", *_safety_lines(results)]
    notes = [f"- {what} skipped: {why}" for what, why in results.get("skipped", {}).items()]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"
