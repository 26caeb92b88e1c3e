"""Preference pairs: one in-memory shape for every chosen/rejected layout, validated and counted.

A `PreferencePair` is a prompt (a `Conversation` ending with a user turn: an optional system
turn, earlier exchanges, the last user message) and two answers to it. Layouts, detected per row:
- text: `{"prompt": str, "chosen": str, "rejected": str}` (TRL's standard preference format).
- Alpaca-style: `{"instruction", "input"?, "chosen", "rejected"}` (the safety pipeline's pairs).
- message lists (UltraFeedback-binarized, TRL's conversational format): `chosen`/`rejected` are
  lists of `{role, content}`; either whole conversations that share every turn but the last
  assistant one, or the assistant turn alone beside a `prompt` (a string or a message list).
- HH-RLHF: `chosen`/`rejected` are whole transcripts `"\\n\\nHuman: ...\\n\\nAssistant: ..."`
  that share everything up to the last `\\n\\nAssistant:`.

The prompt is rendered by the run's chat template exactly as supervised training renders it, so
a DPO run after SFT sees the prompts it was trained on. Malformed pairs (no `rejected`, an empty
answer, chosen equal to rejected, answers that do not share their prompt) are counted by reason
and skipped, or refused with the file and line (`data.on_malformed=error`), as conversations are.
Not for tokens or batches (preference_batches.py).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Literal

from alpaca_jax.data.conversations import OPENAI_ROLES, Conversation, LoadReport, Turn, _reject
from alpaca_jax.data.records import DataError, json_rows

HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    prompt: Conversation       # ends with the user turn both answers reply to
    chosen: str
    rejected: str
    where: str = ""

    def conversation(self, answer: str) -> Conversation:
        return Conversation(self.prompt.turns + (Turn("assistant", answer),), self.where)


class _Malformed(Exception):
    """A pair that cannot be trained on; the message is the reason's name."""


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise _Malformed(f"no '{key}'")
    if not isinstance(value, str):
        raise _Malformed(f"'{key}' is not a string")
    if not value.strip():
        raise _Malformed(f"empty '{key}'")
    return value


def _turns(messages: object, key: str) -> tuple[Turn, ...]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _Malformed(f"'{key}' is not a list of messages")
    turns = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role.lower() not in OPENAI_ROLES:
            raise _Malformed(f"unknown role {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise _Malformed("empty turn")
        turns.append(Turn(OPENAI_ROLES[role.lower()], content))  # type: ignore[arg-type]
    return tuple(turns)


def _checked_prompt(turns: tuple[Turn, ...], where: str) -> Conversation:
    body = turns[1:] if turns and turns[0].role == "system" else turns
    if not body or len(body) % 2 == 0 or any(t.role != ("user" if i % 2 == 0 else "assistant")
                                              for i, t in enumerate(body)):
        raise _Malformed("prompt does not end with a user turn")
    return Conversation(turns, where)


def _split_last_answer(turns: tuple[Turn, ...], key: str) -> tuple[tuple[Turn, ...], str]:
    if not turns or turns[-1].role != "assistant":
        raise _Malformed(f"'{key}' does not end with an assistant turn")
    return turns[:-1], turns[-1].content


def _hh_turns(transcript: str) -> tuple[Turn, ...]:
    parts = HH_TURN.split(transcript)
    if parts[0].strip():
        raise _Malformed("transcript does not start with a Human: turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    turns = tuple(Turn(roles[parts[i]], parts[i + 1].strip())  # type: ignore[arg-type]
                  for i in range(1, len(parts), 2))
    if any(not t.content for t in turns[:-1]):
        raise _Malformed("empty turn")
    return turns


def _messages_pair(row: dict, where: str) -> tuple[Conversation, str, str]:
    chosen, rejected = _turns(row["chosen"], "chosen"), _turns(row.get("rejected"), "rejected")
    if chosen and chosen[0].role != "assistant":  # whole conversations sharing all but the answer
        (head, good), (other, bad) = _split_last_answer(chosen, "chosen"), _split_last_answer(rejected, "rejected")
        if head != other:
            raise _Malformed("chosen and rejected do not share their prompt")
        return _checked_prompt(head, where), good, bad
    prompt = row.get("prompt")
    head = (Turn("user", prompt),) if isinstance(prompt, str) and prompt.strip() else _turns(prompt, "prompt")
    return _checked_prompt(head, where), _split_last_answer(chosen, "chosen")[1], _split_last_answer(rejected, "rejected")[1]


def _hh_pair(row: dict, where: str) -> tuple[Conversation, str, str]:
    chosen, rejected = _hh_turns(_text(row, "chosen")), _hh_turns(_text(row, "rejected"))
    (head, good), (other, bad) = _split_last_answer(chosen, "chosen"), _split_last_answer(rejected, "rejected")
    if head != other:
        raise _Malformed("chosen and rejected do not share their prompt")
    return _checked_prompt(head, where), good, bad


def detect_layout(row: dict) -> str:
    """text | alpaca | messages | hh, from the keys and types of one row."""
    if isinstance(row.get("chosen"), list):
        return "messages"
    if "instruction" in row:
        return "alpaca"
    return "text" if "prompt" in row else "hh"


def pair_from_row(row: object, where: str) -> PreferencePair:
    """One row of any layout -> a validated pair; raises _Malformed(reason)."""
    if not isinstance(row, dict):
        raise _Malformed("not a JSON object")
    if "rejected" not in row:
        raise _Malformed("no 'rejected'")
    layout = detect_layout(row)
    if layout == "messages":
        prompt, chosen, rejected = _messages_pair(row, where)
    elif layout == "hh":
        prompt, chosen, rejected = _hh_pair(row, where)
    else:
        user = (Turn("user", _text(row, "instruction"), row.get("input") or "") if layout == "alpaca"
                else Turn("user", _text(row, "prompt")))
        prompt, chosen, rejected = Conversation((user,), where), _text(row, "chosen"), _text(row, "rejected")
    if chosen.strip() == rejected.strip():
        raise _Malformed("chosen equals rejected")
    return PreferencePair(prompt, chosen, rejected, where)


def pairs_from_rows(rows: Iterable[tuple[str, object]], on_malformed: Literal["skip", "error"] = "skip",
                    ) -> tuple[list[PreferencePair], LoadReport]:
    """(where, row) pairs -> valid preference pairs and the report of what was skipped."""
    out, report = [], LoadReport()
    for where, row in rows:
        try:
            out.append(pair_from_row(row, where))
        except _Malformed as e:
            if on_malformed == "error":
                raise DataError(f"{where}: malformed preference pair: {e} (data.on_malformed=skip "
                                f"skips and counts these)") from None
            _reject(report, where, str(e), "skip")
    report.conversations = len(out)
    return out, report


def read_pairs(path, on_malformed: Literal["skip", "error"] = "skip") -> tuple[list[PreferencePair], LoadReport]:
    """All pairs of one JSON/JSONL file."""
    return pairs_from_rows(((f"{path}:{line}", row) for line, row in json_rows(path)), on_malformed)
