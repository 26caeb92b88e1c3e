"""A committee of teachers behind the one-teacher interface the pipelines already use.

`Committee` answers `complete(requests)` like a `Teacher` (teacher.py), but sends each request
to one of several teachers (`teachers:` in the config), each a `Teacher` with its own client,
concurrency, prices and caps, all writing to the run's one journal:

- `committee.assign: weighted`: request `key` goes to teacher `plan_index(seed, key, weights)`:
  u = int(sha256(f"{seed}/{key}")[:16 hex], 16) / 16**16, and the first teacher whose
  cumulative weight share (cumsum(w) / sum(w)) exceeds u. The plan is a pure function of
  (seed, key, weights): a resumed run makes the same plan, and the journal answers it.
  A teacher that is dropped (below) leaves the plan; its keys are re-planned with the same u
  over the weights of the teachers still alive.
- `committee.assign: per_stage`: `committee.stages` names the teacher of a stage
  (instructions, classification, instances, curation); unnamed stages use the weighted plan.
- `committee.answer: best_of`: in `committee.best_of_stages`, the planned teacher and the next
  k-1 teachers with weight > 0 (list order, wrapping) answer the same request; the
  `committee.judge` teacher sees the request and the answers (judging.py) and picks one. A
  tie or a reply without a verdict line picks index int(sha256(f"{seed}/{key}/tie")[:16 hex], 16)
  % n (counted in the report as such). Only one answer back: kept, no judge call.

A request whose answer is already in the journal (under any teacher's model) is replayed
from it, whoever the plan names now: nothing is paid twice.

A request that failed after its retries goes to another teacher (planned with the same u
among those alive that have not failed it) in the same call; only when every teacher failed it
is it reported failed (a rerun asks again). A teacher is dropped, with a reason logged and
kept in the report, when it refuses (TeacherFatalError: bad key, unknown model), when
`committee.drop_after_failures` of its requests in one batch failed after their retries (a
dead endpoint), or when its own cap (`teachers[].max_requests` ...) is reached; its unanswered
requests go to the teachers still alive, and it gets no new ones. With none alive every
request fails, and the pipeline's no-progress rule ends the run with the reasons.

Budgets: each teacher has its own `Budget` (its caps, its prices); `budget.*` caps the sum.

Not here: the prompts of the judge (judging.py), sending one request (teacher.py).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from typing import Any, Callable

from alpaca_jax.llm.budget import Budget, CapGate
from data_gen.config import BudgetConfig, GenerateConfig, MemberConfig
from alpaca_jax.llm.journal import Journal
from data_gen.judging import best_of_prompt, parse_best
from alpaca_jax.llm.client import Request, Response, Teacher, TeacherFatalError, TeacherStats, request_id

__all__ = ["Committee", "CommitteeBudget", "plan_index", "stage_of", "row_provenance", "unit_interval"]

log = logging.getLogger(__name__)

# The judge answers greedily, with room for a few sentences and the verdict line.
_JUDGE_SAMPLING = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 512}


def unit_interval(text: str) -> float:
    """A number in [0, 1) from the first 64 bits of sha256(text): the plan's only randomness."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16) / 16 ** 16


def plan_index(seed: int, key: str, weights: list[float]) -> int | None:
    """The teacher (index into `weights`) a request key is planned for; None if all weights are 0."""
    total = sum(weights)
    if total <= 0:
        return None
    u = unit_interval(f"{seed}/{key}")
    cumulative = 0.0
    last = None
    for i, weight in enumerate(weights):
        if weight <= 0:
            continue
        cumulative += weight
        last = i
        if u < cumulative / total:
            return i
    return last   # u within rounding of 1.0


def stage_of(key: str) -> str:
    """The pipeline stage a request key belongs to (keys are built by the pipelines)."""
    if key.startswith("self-instruct/classify/"):
        return "classification"
    if key.startswith("self-instruct/instances/"):
        return "instances"
    if key.startswith("curate/"):
        return "curation"
    return "instructions"   # Alpaca requests and Self-Instruct's stage 1


def row_provenance(teacher: Any, keys: dict[str, str]) -> dict[str, Any]:
    """{"provenance": {stage: who answered the request `keys[stage]`}} for a committee run, else {}."""
    if not isinstance(teacher, Committee):
        return {}
    return {"provenance": {stage: teacher.provenance.get(key) for stage, key in keys.items()}}


class CommitteeBudget(CapGate):
    """The total caps (`budget.*`) over the teachers' own budgets, which hold the counts."""

    def __init__(self, config: BudgetConfig, members: dict[str, Budget]):
        super().__init__(config)
        self.members = members

    prompt_tokens = property(lambda self: sum(b.prompt_tokens for b in self.members.values()))
    completion_tokens = property(lambda self: sum(b.completion_tokens for b in self.members.values()))
    requests = property(lambda self: sum(b.requests for b in self.members.values()))
    total_tokens = property(lambda self: self.prompt_tokens + self.completion_tokens)
    cost_usd = property(lambda self: sum(b.cost_usd for b in self.members.values()))


class _Share:
    """The budget one teacher sees: its own caps and the committee's total, both must allow."""

    def __init__(self, own: Budget, total: CommitteeBudget):
        self.own, self.total = own, total

    def reserve(self) -> bool:
        if not self.total.reserve():
            return False
        if not self.own.reserve():
            self.total.release()
            return False
        return True

    def release(self) -> None:
        self.own.release()
        self.total.release()

    def record(self, prompt_tokens: int, completion_tokens: int, reserved: bool = False) -> None:
        self.own.record(prompt_tokens, completion_tokens, reserved)
        if reserved:
            self.total.release()

    def exhausted(self) -> str | None:
        return self.own.exhausted() or self.total.exhausted()


class Committee:
    def __init__(self, config: GenerateConfig, journal: Journal, clients: dict[str, Any] | None = None):
        self.config = config.committee
        self.journal = journal
        self.specs: dict[str, MemberConfig] = {m.name: m for m in config.teachers}
        own = {m.name: Budget(_member_budget(m, config.budget), m.model) for m in config.teachers}
        self.budget = CommitteeBudget(config.budget, own)
        self.members: dict[str, Teacher] = {}
        self.dropped: dict[str, str] = {}
        self.provenance: dict[str, dict[str, Any]] = {}
        self.assigned: dict[str, int] = {m.name: 0 for m in config.teachers}
        self.judging = {"judged": 0, "tie": 0, "unparsed": 0, "one_answer": 0, "no_answer": 0}
        self._lock = threading.Lock()
        for spec in config.teachers:
            try:
                self.members[spec.name] = Teacher(spec, journal, _Share(own[spec.name], self.budget),
                                                  (clients or {}).get(spec.name))
            except TeacherFatalError as e:
                self._drop(spec.name, str(e))
        if not self.alive:      # nobody to send anything to: refuse now, as one teacher would
            raise TeacherFatalError(self.last_error)

    # -- the Teacher interface used by the pipelines ---------------------------------------
    @property
    def alive(self) -> list[str]:
        return [name for name in self.specs if name in self.members and name not in self.dropped]

    @property
    def endpoint(self) -> str:
        return ", ".join(f"{n}={self.members[n].endpoint}" for n in self.members) or "(no teacher)"

    @property
    def last_error(self) -> str | None:
        if not self.alive:
            return "every teacher was dropped: " + "; ".join(f"{n}: {r}" for n, r in self.dropped.items())
        errors = [f"{n}: {t.last_error}" for n, t in self.members.items() if t.last_error]
        return "; ".join(errors) or None

    @property
    def stats(self) -> TeacherStats:
        total = TeacherStats()
        for teacher in self.members.values():
            for f in fields(TeacherStats):
                if f.name == "errors":
                    for name, count in teacher.stats.errors.items():
                        total.errors[name] = total.errors.get(name, 0) + count
                else:
                    setattr(total, f.name, getattr(total, f.name) + getattr(teacher.stats, f.name))
        return total

    def summary(self) -> dict[str, Any]:
        """The committee's part of report.json."""
        return {"assign": self.config.assign, "answer": self.config.answer,
                "teachers": {n: {"model": s.model, "weight": s.weight, "answered": self.assigned[n],
                                 "requests": self.budget.members[n].requests,
                                 "cost_usd": round(self.budget.members[n].cost_usd, 6)}
                             for n, s in self.specs.items()},
                "dropped": dict(self.dropped), "judge": dict(self.judging)}

    def complete(self, requests: list[Request],
                 on_done: Callable[[], None] | None = None) -> dict[str, Response | None]:
        """Responses by request key, as `Teacher.complete` returns them."""
        best_of = set(self.config.best_of_stages) if self.config.answer == "best_of" else set()
        single = [r for r in requests if stage_of(r.key) not in best_of]
        judged = [r for r in requests if stage_of(r.key) in best_of]
        results: dict[str, Response | None] = {}
        if single:
            results.update(self._complete_single(single, on_done))
        if judged:
            results.update(self._complete_best_of(judged, on_done))
        return results

    # -- one teacher per request ----------------------------------------------------------
    def _complete_single(self, requests: list[Request], on_done) -> dict[str, Response | None]:
        results: dict[str, Response | None] = {}
        tried: dict[str, set[str]] = {r.key: set() for r in requests}   # teachers that failed it
        pending = requests
        while pending:
            groups: dict[str, list[Request]] = {}
            for request in pending:
                name = self._route(request, tried[request.key])
                if name is None:
                    results[request.key] = None     # no teacher left: a failure, not a budget stop
                else:
                    groups.setdefault(name, []).append(request)
            pending = []
            for name, (answers, again) in self._run(groups, on_done).items():
                pending += again
                moved = {r.key for r in again}
                for request in groups[name]:
                    if request.key in moved:
                        tried[request.key].add(name)
                    elif request.key in answers:
                        results[request.key] = answers[request.key]
                        self._note(request.key, name, answers[request.key])
        return results

    def _route(self, request: Request, excluded: set[str] = frozenset()) -> str | None:
        """The teacher for a request: whoever holds it in the journal, else the plan among the
        teachers alive and not `excluded` (those that already failed it)."""
        for name, spec in self.specs.items():
            if name in self.members and request_id(request, spec) in self.journal:
                return name
        return self._assigned(request, excluded)

    def _assigned(self, request: Request, excluded: set[str] = frozenset()) -> str | None:
        """The plan's teacher for a request among those alive (per stage, else by weight)."""
        stage_teacher = self.config.stages.get(stage_of(request.key)) if self.config.assign == "per_stage" else None
        if stage_teacher is not None and stage_teacher in self.alive and stage_teacher not in excluded:
            return stage_teacher
        return self._planned(request.key, excluded)

    def _planned(self, key: str, excluded: set[str] = frozenset()) -> str | None:
        alive = set(self.alive) - set(excluded)
        names = list(self.specs)
        weights = [self.specs[n].weight if n in alive else 0.0 for n in names]
        index = plan_index(self.config.seed, key, weights)
        return None if index is None else names[index]

    def _run(self, groups: dict[str, list[Request]], on_done) -> dict[str, tuple[dict, list[Request]]]:
        """Each teacher's group at once (each with its own concurrency). For each teacher: its
        answers, and the requests to send elsewhere because it was dropped meanwhile."""
        def one(name: str) -> tuple[dict, list[Request]]:
            teacher, group = self.members[name], groups[name]
            try:
                answers = teacher.complete(group, on_done)
            except TeacherFatalError as e:
                self._drop(name, str(e))
                # What it completed is journaled: re-routing replays it from there.
                return {}, group
            failed = [r for r in group if r.key in answers and answers[r.key] is None]
            unsent = [r for r in group if r.key not in answers]
            if len(failed) >= self.config.drop_after_failures:
                self._drop(name, f"{len(failed)} of {len(group)} requests in one batch failed after "
                                 f"their retries (last error: {teacher.last_error})")
            spent = teacher.budget.own.exhausted()
            if unsent and spent:
                self._drop(name, f"its own {spent}")
            # Failed requests go to another teacher either way; unsent ones only when this
            # teacher's own cap stopped them (the total cap stops everyone).
            return answers, failed + (unsent if spent else [])

        if not groups:
            return {}
        with ThreadPoolExecutor(max_workers=len(groups)) as pool:
            outcomes = dict(zip(groups, pool.map(one, groups)))
        return outcomes

    def _drop(self, name: str, reason: str) -> None:
        with self._lock:
            if name in self.dropped:
                return
            self.dropped[name] = " ".join(reason.split())
        log.warning("teacher %s dropped from the committee: %s; its work goes to %s", name,
                    self.dropped[name], ", ".join(self.alive) or "nobody")

    def _note(self, key: str, name: str, response: Response | None) -> None:
        if response is not None:
            with self._lock:
                self.assigned[name] += 1
                self.provenance[key] = {"teacher": name, "model": self.specs[name].model}

    # -- best of k ------------------------------------------------------------------------
    def _complete_best_of(self, requests: list[Request], on_done) -> dict[str, Response | None]:
        candidates = {r.key: self._candidates(r) for r in requests}
        groups: dict[str, list[Request]] = {}
        for request in requests:
            for name in candidates[request.key]:
                groups.setdefault(name, []).append(request)
        answers = {name: got for name, (got, _) in self._run(groups, on_done).items()}
        judge_requests, shown = [], {}
        results: dict[str, Response | None] = {}
        for request in requests:
            good = [(n, answers.get(n, {}).get(request.key)) for n in candidates[request.key]]
            good = [(n, a) for n, a in good if a is not None and not a.garbage]
            if len(good) < 2:
                self.judging["one_answer" if good else "no_answer"] += 1
                if good:
                    results[request.key] = good[0][1]
                    self._note(request.key, good[0][0], good[0][1])
                else:
                    results[request.key] = None
                continue
            shown[request.key] = good
            judge_requests.append(Request.build(f"{request.key}/judge",
                                                best_of_prompt(request.prompt, [a.text for _, a in good]),
                                                _JUDGE_SAMPLING, stop=[]))
        verdicts = self._judge(judge_requests, on_done)
        for key, good in shown.items():
            reply = verdicts.get(f"{key}/judge")
            verdict = parse_best(reply.text if reply is not None else None, len(good))
            if isinstance(verdict, int):
                index, shown_verdict = verdict, verdict + 1
                self.judging["judged"] += 1
            else:
                index = int(hashlib.sha256(f"{self.config.seed}/{key}/tie".encode()).hexdigest()[:16], 16) % len(good)
                shown_verdict = verdict or "unparsed"
                self.judging["tie" if verdict == "tie" else "unparsed"] += 1
            name, answer = good[index]
            results[key] = answer
            self._note(key, name, answer)
            self.provenance[key].update({
                "candidates": [self.specs[n].model for n, _ in good],
                "judge": self.specs[self.config.judge].model, "verdict": shown_verdict})
        return results

    def _candidates(self, request: Request) -> list[str]:
        """The planned teacher and the next k-1 answering teachers in list order (wrapping).
        Planned, not looked up in the journal, so a resumed run asks the same k (Teacher.complete
        replays each one's answer from the journal)."""
        answering = [n for n in self.alive if self.specs[n].weight > 0]
        first = self._assigned(request)
        if first is None:
            return []
        ring = answering if first in answering else [first] + answering
        start = ring.index(first)
        ordered = ring[start:] + ring[:start]
        return ordered[: self.config.k]

    def _judge(self, requests: list[Request], on_done) -> dict[str, Response | None]:
        name = self.config.judge
        if not requests or name not in self.members or name in self.dropped:
            return {}
        answers, _ = self._run({name: requests}, on_done)[name]
        return answers


def _member_budget(member: MemberConfig, total: BudgetConfig) -> BudgetConfig:
    """A teacher's own caps, priced by its own prices, else by `budget.prices` for its model."""
    own = member.budget_config()
    if not (member.prompt_per_million or member.completion_per_million) and member.model in total.prices:
        own = BudgetConfig(max_tokens=own.max_tokens, max_cost_usd=own.max_cost_usd,
                           max_requests=own.max_requests, prices={member.model: total.prices[member.model]})
    return own
