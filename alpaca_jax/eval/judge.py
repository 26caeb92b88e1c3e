"""The pairwise LLM judge: ask an OpenAI-compatible model which of two answers is better.

For every instruction of a matchup (run x against run y, or against the file's reference
answers) the judge is asked twice: once with x's answer shown as "Answer A", once with y's.
The requests go through the LLM client's `Teacher` (alpaca_jax/llm/client.py): bounded concurrency,
retries with backoff, a budget, and the append-only journal in which every paid-for reply is
fsync'ed before use. A request's id is a hash of its key, prompt and sampling, so a killed
`alpaca-jax eval` run, rerun into the same output directory, replays every reply it already
has and pays for none twice.

The judge's reply must end with `Verdict: A`, `Verdict: B` or `Verdict: tie` (the prompt,
configs/judge/pairwise.txt, asks for that); anything else is a judgment without verdict,
counted and reported, never guessed.

Not here: the statistics of the verdicts (stats.py), the judge config (config.py).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable

from alpaca_jax.errors import UserError
from alpaca_jax.eval.config import JudgeConfig, load_prompt
from alpaca_jax.eval.stats import PairVerdicts
from alpaca_jax.llm.budget import Budget
from alpaca_jax.llm.client import Request, Teacher, TeacherFatalError
from alpaca_jax.llm.journal import Journal

__all__ = ["Matchup", "JudgeError", "open_judge", "judge_matchups", "parse_verdict", "judge_prompt",
           "JOURNAL_FILE"]

JOURNAL_FILE = "judge_journal.jsonl"   # inside the eval output directory
_VERDICT = re.compile(r"verdict\W{0,3}:\W{0,3}(A|B|tie)\b", re.IGNORECASE)
_UNREACHABLE = ("APIConnectionError", "APITimeoutError")


class JudgeError(UserError, RuntimeError):
    """The judge cannot be used (unreachable, refused, no API key); one line names it."""


@dataclasses.dataclass(frozen=True)
class Matchup:
    """x against y on the same instructions (the prompt text the judge shows for each)."""
    name_x: str
    name_y: str
    instructions: list[str]
    outputs_x: list[str]
    outputs_y: list[str]
    categories: list[str | None]


def parse_verdict(text: str | None) -> str | None:
    """"A", "B" or "tie" from the reply's last verdict line; None when there is none."""
    if not text:
        return None
    found = _VERDICT.findall(text)
    if not found:
        return None
    last = found[-1]
    return "tie" if last.lower() == "tie" else last.upper()


def judge_prompt(template: str, instruction: str, output_a: str, output_b: str) -> str:
    # Plain replacement, not str.format: answers (code!) are full of braces.
    return (template.replace("{instruction}", instruction)
            .replace("{output_a}", output_a).replace("{output_b}", output_b))


def _requests(matchup: Matchup, template: str, sampling: dict) -> list[tuple[Request, Request]]:
    """Both orders of every instruction; the key says which pair, instruction and order."""
    base = f"judge/{matchup.name_x}/vs/{matchup.name_y}"
    return [(Request.build(f"{base}/{i}/x_first", judge_prompt(template, text, x, y), sampling, stop=[]),
             Request.build(f"{base}/{i}/y_first", judge_prompt(template, text, y, x), sampling, stop=[]))
            for i, (text, x, y) in enumerate(zip(matchup.instructions, matchup.outputs_x, matchup.outputs_y))]


def _side(verdict: str | None, x_shown_first: bool) -> str | None:
    """Map the judge's A/B/tie to which side won."""
    if verdict is None or verdict == "tie":
        return verdict
    return "x" if (verdict == "A") == x_shown_first else "y"


def open_judge(cfg: JudgeConfig, out_dir: str | Path) -> Teacher:
    """A teacher client for the judge, journaling into OUT_DIR/judge_journal.jsonl."""
    journal = Journal(Path(out_dir) / JOURNAL_FILE)
    try:
        return Teacher(cfg.judge, journal, Budget(cfg.budget, cfg.judge.model))
    except TeacherFatalError as e:
        journal.close()
        raise JudgeError(f"judge: {e}") from None


def judge_matchups(teacher: Teacher, cfg: JudgeConfig, matchups: list[Matchup],
                   on_done: Callable[[], None] | None = None) -> list[list[PairVerdicts]]:
    """Every instruction of every matchup in both orders; the verdicts per matchup."""
    template = load_prompt(cfg.pairwise)
    sampling = dataclasses.asdict(cfg.sampling)
    pairs = [_requests(m, template, sampling) for m in matchups]
    flat = [r for pair_list in pairs for pair in pair_list for r in pair]
    if not flat:
        return [[] for _ in matchups]
    try:
        # One request first: a judge that cannot be reached fails once, not once per request.
        replies = teacher.complete(flat[:1], on_done)
        if replies.get(flat[0].key) is None and any(e in teacher.stats.errors for e in _UNREACHABLE):
            raise JudgeError(f"judge at {teacher.endpoint} cannot be reached ({teacher.last_error}); "
                             f"check judge.base_url")
        replies.update(teacher.complete(flat[1:], on_done))
    except TeacherFatalError as e:
        raise JudgeError(f"judge at {teacher.endpoint}: {e}") from None
    results = []
    for matchup, pair_list in zip(matchups, pairs):
        verdicts = []
        for i, (x_first, y_first) in enumerate(pair_list):
            a, b = replies.get(x_first.key), replies.get(y_first.key)
            verdicts.append(PairVerdicts(
                index=i, category=matchup.categories[i],
                x_first=_side(parse_verdict(a.text if a else None), x_shown_first=True),
                y_first=_side(parse_verdict(b.text if b else None), x_shown_first=False),
                x_first_reply=a.text if a else None, y_first_reply=b.text if b else None))
        results.append(verdicts)
    return results
