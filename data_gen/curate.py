"""Judge-scored curation (AlpaGasus, Chen et al. 2023): rate every row, keep the best.

Every (instruction, input, output) row is shown to a judge with our rating prompt
(judging.py: accuracy and helpfulness, a final `Score: X` line on a 1-5 scale); rows scored
at least `min_score` are kept. The ratings go through the generator's client: a `Teacher`
(or a committee) with its retries, budget and fsync'ed journal, so a killed run, rerun,
replays every rating it already has and pays for none twice. A request key is `curate/<i>`
(the row's place in the file) and its id hashes the prompt too: an edited row is rated anew.

A reply without a parseable final score line is *unparseable*: counted, reported, and the
row is not kept; never guessed. A rating that failed after its retries, or that the budget
did not allow, is counted apart (a rerun asks again).

Works on the released 52K (`alpaca_data.json`), on our `data.json` (provenance kept), and on
JSONL. `curate_file` writes OUT (the kept rows, same fields as the input), `<OUT stem>.scores.jsonl`
(every row with its `score`, null when unparseable or unanswered), `<OUT stem>.report.json`
(counts and the score histogram) and `<OUT stem>.journal.jsonl` (the ratings paid for).

Not here: the prompt and its parser (judging.py), sending requests (teacher.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from alpaca_jax.llm.budget import Budget
from alpaca_jax.llm.config import RequestSampling
from data_gen.config import CurateConfig
from alpaca_jax.llm.journal import Journal
from data_gen.judging import SCORE_MAX, SCORE_MIN, parse_score, rating_prompt
from data_gen.report import write_json_atomic
from alpaca_jax.llm.client import Request, Teacher

__all__ = ["Curation", "curate_rows", "curate_file", "read_rows", "rating_requests", "curation_paths",
           "write_curation"]

_EDGES = [SCORE_MIN + 0.5 * i for i in range(int((SCORE_MAX - SCORE_MIN) / 0.5) + 1)]   # 1.0, 1.5 ... 5.0


@dataclass
class Curation:
    min_score: float
    scores: list[float | None] = field(default_factory=list)   # by row; None: no score
    kept: list[int] = field(default_factory=list)              # row indices kept, in file order
    unparseable: int = 0      # answered, but no `Score: X` final line (or X outside [1, 5])
    failed: int = 0           # no answer after retries (a rerun asks again)
    not_sent: int = 0         # the budget did not allow the request

    def histogram(self) -> dict[str, list]:
        """Scores in half-point bins [1, 1.5), ..., [4.5, 5]."""
        counts = [0] * (len(_EDGES) - 1)
        for score in self.scores:
            if score is not None:
                counts[min(int((score - SCORE_MIN) / 0.5), len(counts) - 1)] += 1
        return {"edges": _EDGES, "counts": counts}

    def summary(self) -> dict[str, Any]:
        return {"rows": len(self.scores), "kept": len(self.kept), "min_score": self.min_score,
                "scored": sum(s is not None for s in self.scores), "unparseable": self.unparseable,
                "failed": self.failed, "not_sent": self.not_sent, "histogram": self.histogram()}


def rating_requests(rows: list[dict[str, Any]], sampling: RequestSampling) -> list[Request]:
    return [Request.build(f"curate/{i}", rating_prompt(row["instruction"], row.get("input") or "", row["output"]),
                          sampling.params(), stop=[])
            for i, row in enumerate(rows)]


def curate_rows(rows: list[dict[str, Any]], teacher: Any, sampling: RequestSampling, min_score: float,
                on_done: Callable[[], None] | None = None) -> Curation:
    """Rate every row through `teacher` (a Teacher or a Committee); the rows to keep."""
    requests = rating_requests(rows, sampling)
    replies = teacher.complete(requests, on_done) if requests else {}
    result = Curation(min_score)
    for i, request in enumerate(requests):
        score = None
        if request.key not in replies:
            result.not_sent += 1
        elif replies[request.key] is None:
            result.failed += 1
        else:
            score = parse_score(replies[request.key].text)
            result.unparseable += score is None
        result.scores.append(score)
        if score is not None and score >= min_score:
            result.kept.append(i)
    return result


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A JSON array of rows (the released 52K, our data.json) or JSONL; ValueError names the problem."""
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except ValueError:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise ValueError(f"{path}: line {number} is not JSON") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON array of rows or JSONL")
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) \
                or not isinstance(row.get("output"), str):
            raise ValueError(f"{path}: row {number} lacks a string 'instruction' or 'output'")
    return rows


def curation_paths(out: Path) -> dict[str, Path]:
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return {"scores": out.with_name(f"{stem}.scores.jsonl"), "report": out.with_name(f"{stem}.report.json"),
            "journal": out.with_name(f"{stem}.journal.jsonl")}


def write_curation(rows: list[dict[str, Any]], result: Curation, out: Path, extra: dict[str, Any]) -> dict:
    paths = curation_paths(out)
    write_json_atomic(out, [rows[i] for i in result.kept])
    tmp = paths["scores"].with_name(paths["scores"].name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row, score in zip(rows, result.scores):
            f.write(json.dumps({**row, "score": score}, ensure_ascii=False) + "\n")
    tmp.replace(paths["scores"])
    summary = {**result.summary(), **extra}
    write_json_atomic(paths["report"], summary)
    return summary


def curate_file(data: Path, out: Path, config: CurateConfig, min_score: float, client: Any = None,
                bar: Callable[[str, int], Any] | None = None) -> dict[str, Any]:
    """Rate DATA with the judge of `config`; write OUT and its sidecars; the report."""
    rows = read_rows(data)
    journal = Journal(curation_paths(out)["journal"])
    try:
        budget = Budget(config.budget, config.judge.model)
        teacher = Teacher(config.judge, journal, budget, client)
        progress = bar("rows rated", len(rows)) if bar else None
        result = curate_rows(rows, teacher, config.sampling, min_score, progress.update if progress else None)
        if progress:
            progress.close()
    finally:
        journal.close()
    tokens = {"prompt": budget.prompt_tokens, "completion": budget.completion_tokens,
              "total": budget.total_tokens, "cost_usd": round(budget.cost_usd, 6)}
    stats = teacher.stats
    return write_curation(rows, result, out, {
        "judge": config.judge.model, "tokens": tokens,
        "this_run": {"completed": stats.completed, "from_journal": stats.from_journal,
                     "retries": stats.retries, "failed": stats.failed, "last_error": teacher.last_error},
        "budget_stop": budget.exhausted()})
