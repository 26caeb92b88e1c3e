"""`generate(config)`: one run of a pipeline into an output directory, resumable.

The output directory holds:
- `journal.jsonl`  every completed teacher response (append-only, fsync'ed): the run's state;
- `data.json`      the Alpaca-format examples [{instruction, input, output}, ...];
- `pairs.json`     safety with a `complier`: [{instruction, input, chosen, rejected}, ...];
- `report.json`    requests, tokens, cost, kept, dropped by reason, similarity histogram;
- `config.yaml`    the resolved config of the last run;
- with `curation.enabled`: `curated.json` (the examples the judge scored >= curation.min_score),
  `curated.scores.jsonl` (every example with its score) and `curated.report.json` (histogram).

Rerunning the same command in the same directory replays the journal (no network for work
already done) and continues; `data.json` and `report.json` are written atomically at the end,
so they are either absent, from a previous complete run, or complete. They are written on
every stop (target, budget, no progress, max_rounds: `report["stop"]`), holding every task
completed so far; only a refusal by the teacher (`TeacherFatalError`) leaves them as they were.

Not here: the pipelines themselves (alpaca.py, self_instruct.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from alpaca_jax.configlib import ConfigError, dump_yaml
from alpaca_jax.files import check_writable_dir
from alpaca_jax.llm.budget import Budget
from alpaca_jax.llm.client import Teacher
from alpaca_jax.llm.journal import Journal
from data_gen.alpaca import run_alpaca
from data_gen.batch import BatchTeacher
from data_gen.committee import Committee
from data_gen.config import GenerateConfig
from data_gen.curate import Curation, curate_rows, write_curation
from data_gen.report import Report, write_json_atomic
from data_gen.seeds import load_seed_tasks
from data_gen.safety import run_safety
from data_gen.self_instruct import run_self_instruct

__all__ = ["generate", "bar_factory"]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def bar_factory(enabled: bool):
    if not enabled:
        return lambda desc, total: _NoBar()
    from tqdm import tqdm

    return lambda desc, total: tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)


def generate(config: GenerateConfig, client: Any = None) -> dict[str, Any]:
    """Run (or resume) the configured pipeline; returns the report that was written."""
    started = time.time()
    out = Path(config.output.dir)
    # Both checks come before the output directory is touched: a failed start leaves nothing.
    check_writable_dir(out, "output.dir", ConfigError)
    seeds = load_seed_tasks(config.pipeline.seed_path)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out / "journal.jsonl")  # a damaged journal stops the run before anything is written
    dump_yaml(config, out / "config.yaml")
    try:
        teacher = None
        teacher = _open_teacher(config, journal, client)
        budget = teacher.budget
        report = Report(pipeline=config.pipeline.name)
        bar = bar_factory(config.output.progress)
        pairs = None
        if config.pipeline.name == "safety":
            # The complying endpoint shares the journal (its request keys differ) and the budget.
            complier = Teacher(config.complier, journal, budget) if config.complier is not None else None
            examples, pairs = run_safety(config, teacher, complier, report, bar)
        elif config.pipeline.name == "alpaca":
            examples = run_alpaca(config, seeds, teacher, report, bar)
        else:
            examples = run_self_instruct(config, seeds, teacher, report, bar)
        curation = _curate(config, teacher, examples, bar) if config.curation.enabled else None
    finally:
        if isinstance(teacher, BatchTeacher):
            teacher.close()
        journal.close()
    tokens = {"prompt": budget.prompt_tokens, "completion": budget.completion_tokens,
              "total": budget.total_tokens, "cost_usd": round(budget.cost_usd, 6)}
    stats = teacher.stats
    summary = report.to_dict(
        teacher_stats={"completed_total": len(journal),
                       "garbage_total": sum(r.get("text") is None for r in journal.records())},
        budget=tokens,
        this_run={"sent": stats.sent, "completed": stats.completed, "from_journal": stats.from_journal,
                  "retries": stats.retries, "failed": stats.failed, "garbage": stats.garbage,
                  "skipped_for_budget": stats.skipped_for_budget, "errors": dict(stats.errors),
                  "seconds": round(time.time() - started, 3)})
    if isinstance(teacher, Committee):
        summary["committee"] = teacher.summary()
    if isinstance(teacher, BatchTeacher):
        summary["batch"] = dict(teacher.batch_stats)
    write_json_atomic(out / "data.json", examples)
    if curation is not None:
        summary["curation"] = write_curation(examples, curation, out / "curated.json", {})
    if pairs is not None and config.complier is not None:
        write_json_atomic(out / "pairs.json", pairs)
    write_json_atomic(out / "report.json", summary)
    return summary


def _curate(config: GenerateConfig, teacher: Any, examples: list[dict], bar) -> Curation:
    """The curation stage: the same client, journal and budget rate every kept example."""
    judge = teacher
    if isinstance(teacher, Committee) and config.curation.judge is not None:
        judge = teacher.members[config.curation.judge]
    progress = bar("examples rated", len(examples))
    result = curate_rows(examples, judge, config.curation.sampling(), config.curation.min_score,
                         progress.update)
    progress.close()
    return result


def _open_teacher(config: GenerateConfig, journal: Journal, client: Any):
    """The committee when `teachers` is set, else the one `teacher`, online or through the Batch
    API (`client`: tests inject one)."""
    if config.teachers:
        return Committee(config, journal, client)
    if config.teacher.mode == "batch":
        return BatchTeacher(config.teacher, config.batch, journal,
                            Budget(config.budget, config.teacher.model), client)
    return Teacher(config.teacher, journal, Budget(config.budget, config.teacher.model), client)
