"""`alpaca-jax eval`: several runs on one eval file, compared in one table.

For each RUN (a run directory, one checkpoint, an import-hf output, a local HF directory, or an
AlpacaEval model-outputs JSON file): perplexity on the file's reference answers, greedy (or
configured) generations saved in AlpacaEval's layout, ROUGE-L against the references, and,
with a judge config, pairwise judging of every run against the baseline (the file's
references, or one of the runs). With `tasks`, lm-evaluation-harness tasks too (harness.py),
each task's metrics with their stderr in the run's row. Results go to OUT_DIR/results.json and
OUT_DIR/results.md, and to OUT_DIR/index.html, a self-contained page with every answer side by
side (report_page.py).

Rerunning into the same OUT_DIR after a kill regenerates answers (free, deterministic) and
replays every judge reply from the journal (paid once).

Not here: the decoding (alpaca_jax.infer), the judge's client (judge.py), the statistics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

from alpaca_jax.errors import UserError
from alpaca_jax.eval.config import JudgeConfig
from alpaca_jax.eval.dataset import EvalItem, load_eval_file
from alpaca_jax.eval.judge import Matchup, judge_matchups, open_judge
from alpaca_jax.eval.outputs import read_model_outputs, write_model_outputs
from alpaca_jax.eval.report import markdown_table
from alpaca_jax.eval.report_page import write_report_page
from alpaca_jax.eval.rouge import mean_rouge_l
from alpaca_jax.eval.safety import REFUSAL_PROMPT_FILE, judge_refusals, load_safety_file, safety_summary
from alpaca_jax.eval.stats import summarize

__all__ = ["EvalError", "evaluate", "REFERENCES"]

log = logging.getLogger("alpaca_jax")

REFERENCES = "references"   # the baseline name of the eval file's own answers


class EvalError(UserError, RuntimeError):
    """Bad eval input (missing run, impossible baseline); one line names it."""


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "run"


def _unique(name: str, taken: set[str]) -> str:
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name}-{k}", k + 1
    taken.add(candidate)
    return candidate


def _model_answers(source: str, items: list[EvalItem], sampling, max_new_tokens: int, batch_size: int,
                   with_references: bool, tasks: "TaskRun | None") -> tuple[str, list[str], dict]:
    """Load a model, score the references, generate, run the tasks: (name, outputs, metrics)."""
    from alpaca_jax.eval.perplexity import reference_loss
    from alpaca_jax.infer import Row, SamplingConfig, decode_rows, load_model  # only when a model is evaluated
    model = load_model(source, mesh=_training_mesh(source))
    sampling = SamplingConfig(max_new_tokens=max_new_tokens) if sampling is None else sampling
    metrics: dict = {}
    if with_references:
        loss, stats = reference_loss(model, items)
        metrics = {"perplexity": loss.perplexity, "reference_loss": loss.loss,
                   "reference_tokens": loss.tokens, "reference_tokenize": stats}
    # Prompt ids from the run's own template (data/prompt.py), every one checked before any decodes.
    rows = [Row(model.encode_messages(item.messages), sampling) for item in items]
    completions = decode_rows(model, rows, batch_size) if items else []
    if items:
        metrics["finish_reasons"] = _count(c.finish_reason for c in completions)
    if tasks is not None:
        metrics["tasks"] = tasks.scores(model, batch_size)
    return model.name, [c.text for c in completions], metrics


def _training_mesh(source: str):
    """The mesh the run trained on (its `mesh` section; the default for an HF directory) when
    more than one device is visible; None (the default device) otherwise."""
    import jax
    if jax.device_count() == 1:
        return None
    from alpaca_jax import sharding
    from alpaca_jax.checkpoint import find_params
    from alpaca_jax.config import MeshConfig
    hf_dir = (Path(source) / "config.json").is_file()
    return sharding.make_mesh(MeshConfig() if hf_dir else find_params(source).config.mesh)


@dataclasses.dataclass(frozen=True)
class TaskRun:
    """lm-evaluation-harness tasks to run on every model (checked before any model loads)."""
    names: tuple[str, ...]
    manager: object                 # lm_eval.tasks.TaskManager that knows every name
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    apply_chat_template: bool = False

    def scores(self, model, batch_size: int) -> dict:
        from alpaca_jax.eval.harness import task_scores
        return task_scores(model, list(self.names), manager=self.manager, num_fewshot=self.num_fewshot,
                           limit=self.limit, apply_chat_template=self.apply_chat_template, batch_size=batch_size)

    def summary(self) -> dict:
        return {"names": list(self.names), "include_path": self.include_path, "num_fewshot": self.num_fewshot,
                "limit": self.limit, "apply_chat_template": self.apply_chat_template}


def _task_run(tasks, include_path, num_fewshot, limit, apply_chat_template=False) -> TaskRun | None:
    if not tasks:
        return None
    try:
        from alpaca_jax.eval.tasks import load_tasks  # lm-eval is an optional dependency
    except ModuleNotFoundError as e:
        if e.name != "lm_eval":
            raise
        raise EvalError("--tasks needs lm-evaluation-harness: pip install 'alpaca-jax[lm-eval]'") from None
    if num_fewshot is not None and num_fewshot < 0:
        raise EvalError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    return TaskRun(tuple(tasks), load_tasks(list(tasks), include_path),
                   None if include_path is None else str(include_path), num_fewshot, limit, apply_chat_template)


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[str(v)] = counts.get(str(v), 0) + 1
    return counts


def _resolve_baseline(baseline: str | None, runs: list[str], names: list[str], has_refs: bool,
                      data: str) -> tuple[str, int | None]:
    """(baseline name, index of the baseline run or None for the references)."""
    if baseline is None:
        baseline = REFERENCES if has_refs else runs[0]
    if baseline == REFERENCES:
        if not has_refs:
            raise EvalError(f"--baseline {REFERENCES}: {data} has no reference outputs to judge against")
        return REFERENCES, None
    for i, (source, name) in enumerate(zip(runs, names)):
        if baseline in (source, name):
            return name, i
    raise EvalError(f"--baseline {baseline}: neither '{REFERENCES}' nor one of the runs "
                    f"({', '.join(names)})")


def evaluate(runs: list[str], data: str | None, out_dir: str | Path, *, judge: JudgeConfig | None = None,
             baseline: str | None = None, sampling=None, max_new_tokens: int = 256, batch_size: int = 16,
             limit: int | None = None, progress: bool = True, tasks: list[str] | None = None,
             include_path: str | Path | None = None, num_fewshot: int | None = None,
             apply_chat_template: bool = False, safety: bool = False) -> dict:
    """Evaluate `runs` on `data` and/or lm-eval `tasks` (from `include_path` or lm-eval's own);
    writes OUT_DIR/{results.json, results.md, index.html, model_outputs/}. `sampling` is an
    infer.SamplingConfig (default: greedy, `max_new_tokens` long); `limit` caps the eval file's
    rows and each task's documents. With `safety`, `data` is a safety file (eval/safety.py) and
    the judge decides refusals instead."""
    if data is None and not tasks:
        raise EvalError("nothing to evaluate: give an eval file (--data), lm-eval tasks (--tasks), or both")
    if judge is not None and data is None:
        raise EvalError("--judge needs an eval file (--data) whose answers it judges")
    if safety and judge is None:
        raise EvalError("--safety needs --judge CONFIG: the judge decides which answers refuse")
    for run in runs:  # fail before any work, naming the first missing one
        if not Path(run).exists():
            raise EvalError(f"run not found: {run}")
    unsafe: list[bool] = []
    if safety:
        items, unsafe = load_safety_file(data)
        items, unsafe = items[:limit], unsafe[:limit]
    else:
        items = load_eval_file(data)[:limit] if data is not None else []
    task_run = _task_run(tasks, include_path, num_fewshot, limit, apply_chat_template)  # a bad task fails before models load
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with_refs = [i for i in items if i.reference is not None]
    has_refs = data is not None and len(with_refs) == len(items)
    skipped = {}
    if data is None:
        skipped = {"perplexity": "no eval file (--data)", "rouge_l": "no eval file (--data)"}
    elif not has_refs:
        why = (f"{data} has no reference outputs" if not with_refs
               else f"{len(items) - len(with_refs)} of {len(items)} rows of {data} have no reference output")
        skipped = {"perplexity": why, "rouge_l": why}
    if judge is not None and baseline == REFERENCES and not has_refs:
        raise EvalError(f"--baseline {REFERENCES}: {data} has no reference outputs to judge against")
    # Opened before any generation: a missing API key should not wait for minutes of decoding.
    teacher = open_judge(judge, out_dir) if judge is not None else None
    try:
        rows, outputs = _answer_all(runs, items, out_dir, sampling, max_new_tokens, batch_size, has_refs, task_run)
        results = {"data": None if data is None else str(data), "instructions": len(items), "references": has_refs,
                   "skipped": skipped, "baseline": None, "runs": rows,
                   "tasks": None if task_run is None else task_run.summary()}
        verdicts = {}
        if teacher is not None and safety:
            results.update(_judge_safety(teacher, judge, items, unsafe, rows, outputs, progress))
        elif teacher is not None:
            judged, verdicts = _judge(teacher, judge, items, runs, rows, outputs, baseline, has_refs, data, progress)
            results.update(judged)
    finally:
        if teacher is not None:
            teacher.journal.close()
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out_dir / "results.md").write_text(markdown_table(results), encoding="utf-8")
    write_report_page(out_dir, results, items, outputs, verdicts)
    return results


def _answer_all(runs, items, out_dir: Path, sampling, max_new_tokens: int, batch_size: int,
                has_refs: bool, task_run: TaskRun | None) -> tuple[list[dict], list[list[str]]]:
    """Every run's answers and scores (one result row per run), outputs files written."""
    rows, outputs, taken = [], [], set()
    for run in runs:
        path = Path(run)
        if path.is_file():  # an AlpacaEval model-outputs file: answers only, no model to score
            name, answers = read_model_outputs(path, items)
            metrics = {"perplexity_skipped": "a model-outputs file has no model to score",
                       "tasks": None}
        else:
            name, answers, metrics = _model_answers(run, items, sampling, max_new_tokens, batch_size, has_refs,
                                                    task_run)
        name = _unique(name, taken)
        outputs_file = (write_model_outputs(out_dir / "model_outputs" / f"{_safe_name(name)}.json",
                                            items, answers, name) if items else None)
        row = {"name": name, "source": str(run), "outputs_file": None if outputs_file is None else str(outputs_file),
               "perplexity": metrics.pop("perplexity", None), **metrics,
               "rouge_l": mean_rouge_l(answers, [i.reference for i in items]) if has_refs else None,
               "mean_output_words": sum(len(a.split()) for a in answers) / len(answers) if answers else None,
               "judge": None}
        rows.append(row)
        outputs.append(answers)
        log.info("%s: perplexity %s, ROUGE-L %s", name, row["perplexity"], row["rouge_l"])
    return rows, outputs


def _judge_safety(teacher, cfg: JudgeConfig, items, unsafe: list[bool], rows, outputs, progress: bool) -> dict:
    """Every run's answers judged refuse/comply; fills each row's `safety` entry."""
    from tqdm.auto import tqdm
    with tqdm(total=len(items) * len(rows), desc="safety judge", unit="req", disable=not progress) as bar:
        for row, answers in zip(rows, outputs):
            refused = judge_refusals(teacher, cfg, row["name"], items, answers, on_done=lambda: bar.update(1))
            row["safety"] = safety_summary(refused, unsafe, cfg.pairwise.bootstrap_samples, cfg.pairwise.seed)
    return {"safety": {"model": cfg.judge.model, "prompt": str(REFUSAL_PROMPT_FILE),
                       "requests_sent": teacher.stats.sent, "answered_from_journal": teacher.stats.from_journal}}


def _judge(teacher, cfg: JudgeConfig, items, runs, rows, outputs, baseline, has_refs, data,
           progress: bool) -> tuple[dict, dict]:
    """Every run but the baseline against the baseline; fills each row's `judge` entry.
    Returns the results' judge fields, and each judged run's verdicts by its name."""
    names = [r["name"] for r in rows]
    base_name, base_index = _resolve_baseline(baseline, runs, names, has_refs, data)
    base_outputs = [i.reference for i in items] if base_index is None else outputs[base_index]
    contenders = [k for k in range(len(rows)) if k != base_index]
    matchups = [Matchup(names[k], base_name, [i.question for i in items], outputs[k], base_outputs,
                        [i.category for i in items]) for k in contenders]
    from tqdm.auto import tqdm
    with tqdm(total=2 * len(items) * len(matchups), desc="judge", unit="req", disable=not progress) as bar:
        verdicts = judge_matchups(teacher, cfg, matchups, on_done=lambda: bar.update(1))
    for k, pairs in zip(contenders, verdicts):
        rows[k]["judge"] = summarize(pairs, cfg.pairwise.bootstrap_samples, cfg.pairwise.seed)
    stats = teacher.stats
    fields = {"baseline": base_name, "judge": {
        "model": cfg.judge.model, "base_url": cfg.judge.base_url, "prompt": str(cfg.pairwise.prompt_path),
        "requests_sent": stats.sent, "answered_from_journal": stats.from_journal, "failed": stats.failed,
        "skipped_for_budget": stats.skipped_for_budget, "prompt_tokens": teacher.budget.prompt_tokens,
        "completion_tokens": teacher.budget.completion_tokens, "cost_usd": teacher.budget.cost_usd}}
    return fields, {names[k]: pairs for k, pairs in zip(contenders, verdicts)}
