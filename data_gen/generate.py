"""`generate(config)`: one run of a pipeline into an output directory, resumable.

The output directory holds:
- `journal.jsonl`  every completed teacher response (append-only, fsync'ed): the run's state;
- `data.json`      the Alpaca-format examples [{instruction, input, output}, ...];
- `report.json`    requests, tokens, cost, kept, dropped by reason, similarity histogram;
- `config.yaml`    the resolved config of the last run.

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
from data_gen.config import GenerateConfig
from data_gen.report import Report, write_json_atomic
from data_gen.seeds import load_seed_tasks
from data_gen.self_instruct import run_self_instruct

__all__ = ["generate"]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar_factory(enabled: bool):
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
    budget = Budget(config.budget, config.teacher.model)
    try:
        teacher = Teacher(config.teacher, journal, budget, client)
        report = Report(pipeline=config.pipeline.name)
        bar = _bar_factory(config.output.progress)
        if config.pipeline.name == "alpaca":
            examples = run_alpaca(config, seeds, teacher, report, bar)
        else:
            examples = run_self_instruct(config, seeds, teacher, report, bar)
    finally:
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
    write_json_atomic(out / "data.json", examples)
    write_json_atomic(out / "report.json", summary)
    return summary
