"""Our two judge prompts and their parsers: best-of-k answer picking and AlpaGasus-style rating.

Both ask for a fixed final line, and both parsers read only that line: a reply without it is
*unparseable*, counted by the caller and never guessed (a best-of without a verdict falls to the
seeded tie-break, a rating without a score keeps the row out and is counted apart).

- `best_of_prompt` shows the request and k answers as "Answer 1..k"; the last line must be
  `Best: N` (1-based) or `Best: tie`.
- `rating_prompt` shows one (instruction, input, output) row and asks for accuracy and
  helpfulness on a 1-5 scale, as AlpaGasus (Chen et al. 2023) rated Alpaca's 52K; the last line
  must be `Score: X` (X a number in [1, 5], one decimal allowed).

Not here: sending the prompts (committee.py, curate.py), what a verdict changes.
"""

from __future__ import annotations

import re

__all__ = ["best_of_prompt", "parse_best", "rating_prompt", "parse_score", "SCORE_MIN", "SCORE_MAX"]

SCORE_MIN, SCORE_MAX = 1.0, 5.0
_BEST = re.compile(r"^\W{0,3}best\W{0,3}:\W{0,3}(\d+|tie)\W{0,3}$", re.IGNORECASE)
_SCORE = re.compile(r"^\W{0,3}score\W{0,3}:\s*(\d(?:\.\d+)?)\s*(?:/\s*5)?\W{0,3}$", re.IGNORECASE)

_BEST_OF = """\
Several assistants answered the same request. Judge which answer follows the request most
accurately and helpfully (correct, complete, in the requested format, no invented facts).

### Request
{request}

{answers}

Explain your reasoning in a few sentences, then end with one final line of exactly this form:
Best: N
where N is the number of the best answer (1 to {k}), or "Best: tie" if they are equally good."""

_RATING = """\
We would like your feedback on the response of an AI assistant to the instruction and input
below. Rate the response for accuracy (is it correct and does it do what the instruction asks,
given the input?) and helpfulness (is it complete, clear and useful?).

### Instruction
{instruction}

### Input
{input}

### Response
{output}

Give a short explanation, then end with one final line of exactly this form:
Score: X
where X is a number from 1 (wrong or useless) to 5 (accurate and very helpful); one decimal
is allowed."""


def best_of_prompt(request: str, answers: list[str]) -> str:
    # Plain replacement, not str.format: requests and answers (code!) are full of braces.
    shown = "\n\n".join(f"### Answer {i}\n{text}" for i, text in enumerate(answers, 1))
    return (_BEST_OF.replace("{k}", str(len(answers))).replace("{answers}", shown)
            .replace("{request}", request))


def parse_best(text: str | None, k: int) -> int | str | None:
    """The 0-based index of the chosen answer, "tie", or None when the final line is not a verdict."""
    line = _final_line(text)
    found = _BEST.match(line) if line else None
    if not found:
        return None
    value = found.group(1).lower()
    if value == "tie":
        return "tie"
    index = int(value) - 1
    return index if 0 <= index < k else None


def rating_prompt(instruction: str, task_input: str, output: str) -> str:
    shown_input = task_input.strip() or "(none)"
    return (_RATING.replace("{instruction}", instruction).replace("{input}", shown_input)
            .replace("{output}", output))


def parse_score(text: str | None) -> float | None:
    """The score of the final `Score: X` line, or None (no such line, or X outside [1, 5])."""
    line = _final_line(text)
    found = _SCORE.match(line) if line else None
    if not found:
        return None
    score = float(found.group(1))
    return score if SCORE_MIN <= score <= SCORE_MAX else None


def _final_line(text: str | None) -> str | None:
    if not text:
        return None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None
