"""One batch of teacher requests, used in request order, and the rules that end a run early.

Both pipelines work in batches: the Alpaca rounds, and Self-Instruct's three stages within a
round. `Rounds.send` is the one place that sends a batch and reads it back:

- before sending, a spent budget stops the run (`RunStopped("budget")`);
- answers are used in request order, up to the first request the budget did not allow, so what
  a budget stop writes is exactly what an uninterrupted run would have at that point;
- a request that failed after its retries is skipped (a rerun asks again), a garbage response
  is counted and handed on unparsed, a reply is parsed by the caller's `parse`, and the
  caller's `accept` uses the answer and says how many things it kept;
- a stage whose last `pipeline.max_idle_rounds` batches kept nothing (every request failed,
  was garbage, held no task, or held only tasks the filters and dedup dropped) stops the run
  (`RunStopped("no_progress")`) with one line naming the endpoint and the last error: a dead
  endpoint or a teacher answering only garbage costs a bounded number of requests instead of
  `max_rounds` rounds of them.

Not here: what to ask (the pipelines) or how one request is sent and retried (alpaca_jax/llm/client.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from alpaca_jax.llm.client import Request, Response, Teacher
from data_gen.report import Report

__all__ = ["Rounds", "RunStopped", "Answer"]


class RunStopped(Exception):
    """The run ends before its target: `stop` is one of report.STOPS, `reason` one line."""

    def __init__(self, stop: str, reason: str):
        super().__init__(reason)
        self.stop = stop
        self.reason = reason


@dataclass(frozen=True)
class Answer:
    request: Request
    response: Response | None     # None: failed after all retries (not paid, asked again on rerun)
    parsed: Any                   # what `parse` made of the reply; None when failed or garbage


@dataclass
class _Streak:
    """Consecutive batches of one stage that kept nothing, and what they held."""
    batches: int = 0
    requests: int = 0
    failed: int = 0
    garbage: int = 0
    no_task: int = 0
    dropped: int = 0


class Rounds:
    def __init__(self, teacher: Teacher, report: Report, max_idle_rounds: int):
        self.teacher = teacher
        self.report = report
        self.max_idle_rounds = max_idle_rounds
        self._streaks: dict[str, _Streak] = {}
        self._last_no_task: str | None = None

    def send(self, stage: str, requests: list[Request], parse: Callable[[Request, Response], Any],
             usable: Callable[[Any], bool], accept: Callable[[Answer], int]) -> None:
        """Send `requests` and `accept` each answer in request order (failed requests excepted),
        up to the first one the budget did not allow. `usable(parsed)`: the reply held a task."""
        spent = self.teacher.budget.exhausted()
        if spent:
            raise RunStopped("budget", spent)
        responses = self.teacher.complete(requests)
        streak = _Streak(batches=1)
        kept = 0
        for request in requests:
            if request.key not in responses:
                break                      # not sent: the budget ran out within this batch
            response = responses[request.key]
            streak.requests += 1
            if response is None:
                streak.failed += 1
                continue
            parsed = None
            if response.garbage:
                self.report.drop("unparseable_response")
                streak.garbage += 1
            else:
                parsed = parse(request, response)
                if not usable(parsed):
                    self.report.unusable_answers += 1
                    self._last_no_task = response.text
                    streak.no_task += 1
            taken = accept(Answer(request, response, parsed))
            streak.dropped += taken == 0 and parsed is not None and usable(parsed)
            kept += taken
        if streak.requests == len(requests):  # a batch cut by the budget says nothing of the teacher
            self._judge(stage, streak, kept)

    def _judge(self, stage: str, batch: _Streak, kept: int) -> None:
        if kept:
            self._streaks.pop(stage, None)
            return
        streak = self._streaks.setdefault(stage, _Streak())
        for name in ("batches", "requests", "failed", "garbage", "no_task", "dropped"):
            setattr(streak, name, getattr(streak, name) + getattr(batch, name))
        if streak.batches >= self.max_idle_rounds:
            raise RunStopped("no_progress", self._no_progress_reason(stage, streak))

    def _no_progress_reason(self, stage: str, streak: _Streak) -> str:
        if streak.failed or streak.garbage:
            last = (self.teacher.last_error or "unknown").rstrip(".")
        elif streak.no_task:
            last = f"a reply with no task in it: {' '.join(str(self._last_no_task).split())[:120]!r}"
        else:
            last = "every task was dropped by the filters or as a duplicate (see report.json)"
        return (f"no progress from the teacher at {self.teacher.endpoint} in {streak.batches} "
                f"consecutive {stage} batches ({streak.requests} requests: {streak.failed} failed, "
                f"{streak.garbage} garbage, {streak.no_task} without a task, {streak.dropped} with "
                f"every task dropped); last error: {last}; the journal is intact, rerun the same "
                "command to resume")
