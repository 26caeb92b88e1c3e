"""Conversations: one in-memory shape for every training layout, validated and counted.

A `Conversation` is an optional system turn, then user/assistant turns alternating, user first,
ending on an assistant turn. Every layout becomes one:
- ShareGPT (Vicuna's data): `{"conversations": [{"from": "human"|"gpt"|"system", "value"}]}`.
- OpenAI chat: `{"messages": [{"role": "user"|"assistant"|"system", "content"}]}`.
- OpenAssistant message trees (oasst1 export): one message per row with `message_id`,
  `parent_id` (null at the root), `role` prompter/assistant, `text`, optional `rank`; each tree
  is flattened along its best-ranked path (`flatten_message_trees`).
- Alpaca and Self-Instruct rows: one user turn (instruction, plus the Alpaca `input` kept apart
  so the Alpaca template can render it as the original did) and one assistant turn.

Malformed conversations (roles out of order, an empty turn, an unknown role, no assistant turn)
are counted by reason and skipped, or refused with the file and line, as `on_malformed` says.
A trailing user turn that nothing answers is dropped (counted): it teaches nothing. Alpaca rows
keep the strict checks of `records.py` (a wrong field type is an error in the file, not data).
Not for rendering text (`chat.py`) or tokens (`tokenize.py`).
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Iterable, Literal

from alpaca_jax.data.records import DataError, alpaca_rows, json_rows

Role = Literal["system", "user", "assistant"]
FORMATS = ("auto", "alpaca", "seed_tasks", "sharegpt", "openai", "oasst")
# ShareGPT's `from` values as they occur in the wild (FastChat accepts the same set).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "assistant": "assistant", "system": "system"}
OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


@dataclasses.dataclass(frozen=True)
class Turn:
    role: Role
    content: str
    input: str = ""    # Alpaca's optional context for a user turn; other layouts leave it empty


@dataclasses.dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    where: str = ""    # "file:line" of the row it came from, for error messages

    @property
    def system(self) -> str | None:
        return self.turns[0].content if self.turns and self.turns[0].role == "system" else None

    @property
    def exchanges(self) -> list[tuple[Turn, Turn]]:
        """(user, assistant) pairs, in order; the system turn is not part of any."""
        body = self.turns[1:] if self.system is not None else self.turns
        return [(body[i], body[i + 1]) for i in range(0, len(body), 2)]

    def with_exchanges(self, start: int, stop: int) -> "Conversation":
        """The system turn (if any) and exchanges [start, stop): one piece of a split."""
        head = self.turns[:1] if self.system is not None else ()
        body = [t for pair in self.exchanges[start:stop] for t in pair]
        return Conversation(tuple(head) + tuple(body), self.where)


@dataclasses.dataclass
class LoadReport:
    """What loading found, per reason; logged and written to summary.json."""
    conversations: int = 0                     # valid conversations produced
    malformed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    malformed_where: list[str] = dataclasses.field(default_factory=list)  # first few, for the log
    trailing_user_dropped: int = 0             # unanswered last user turns removed
    oasst_trees: int = 0                       # OpenAssistant trees seen
    oasst_messages_skipped: int = 0            # deleted or review-rejected messages

    def add(self, other: "LoadReport") -> None:
        self.conversations += other.conversations
        self.malformed.update(other.malformed)
        self.malformed_where.extend(other.malformed_where[:10 - len(self.malformed_where)])
        self.trailing_user_dropped += other.trailing_user_dropped
        self.oasst_trees += other.oasst_trees
        self.oasst_messages_skipped += other.oasst_messages_skipped

    def as_dict(self) -> dict:
        return {"conversations": self.conversations, "malformed": dict(self.malformed),
                "trailing_user_dropped": self.trailing_user_dropped,
                "oasst_trees": self.oasst_trees, "oasst_messages_skipped": self.oasst_messages_skipped}


class _Malformed(Exception):
    """A conversation that cannot be trained on; the message is the reason's name."""


def _validated(raw_turns: list[tuple[object, object]], roles: dict[str, str], where: str,
               report: LoadReport) -> Conversation:
    """Check roles and order; raise _Malformed(reason) or return the Conversation."""
    turns = []
    for role, content in raw_turns:
        if not isinstance(role, str) or role.lower() not in roles:
            raise _Malformed(f"unknown role {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise _Malformed("empty turn")
        turns.append(Turn(roles[role.lower()], content))  # type: ignore[arg-type]
    body = turns[1:] if turns and turns[0].role == "system" else turns
    trailing_user = bool(body) and body[-1].role == "user" and len(body) % 2 == 1
    if trailing_user:
        body, turns = body[:-1], turns[:-1]
    for i, turn in enumerate(body):
        if turn.role != ("user" if i % 2 == 0 else "assistant"):
            raise _Malformed("roles out of order")
    if not body:
        raise _Malformed("no assistant turn")
    report.trailing_user_dropped += trailing_user
    return Conversation(tuple(turns), where)


def _turn_pairs(row: dict, layout: str) -> list[tuple[object, object]]:
    key, role_key, text_key = (("conversations", "from", "value") if layout == "sharegpt"
                               else ("messages", "role", "content"))
    turns = row.get(key)
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise _Malformed(f"'{key}' is not a list of objects")
    return [(t.get(role_key), t.get(text_key)) for t in turns]


def _detect(row: object, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if isinstance(row, dict):
        for key, layout in (("conversations", "sharegpt"), ("messages", "openai"),
                            ("message_id", "oasst"), ("instances", "seed_tasks")):
            if key in row:
                return layout
    return "alpaca"


def conversations_from_rows(rows: Iterable[tuple[str, object]], fmt: str = "auto",
                            on_malformed: Literal["skip", "error"] = "skip",
                            ) -> tuple[list[Conversation], LoadReport]:
    """Rows as (where, value) pairs -> valid conversations and the report of what was skipped.

    `where` names the row ("file:line") in errors. OpenAssistant rows are gathered and
    flattened once all rows are read (a tree's messages may come in any order).
    """
    out: list[Conversation] = []
    report = LoadReport()
    oasst: list[tuple[str, dict]] = []
    for where, row in rows:
        layout = _detect(row, fmt)
        if layout in ("alpaca", "seed_tasks"):
            for r in alpaca_rows(where, row, layout):
                out.append(Conversation((Turn("user", r["instruction"], r["input"]),
                                         Turn("assistant", r["output"])), where))
            continue
        if layout == "oasst":
            if not isinstance(row, dict):
                raise DataError(f"{where}: each row must be a JSON object, got {type(row).__name__}")
            oasst.append((where, row))
            continue
        try:
            if not isinstance(row, dict):
                raise _Malformed("not a JSON object")
            roles = SHAREGPT_ROLES if layout == "sharegpt" else OPENAI_ROLES
            out.append(_validated(_turn_pairs(row, layout), roles, where, report))
        except _Malformed as e:
            _reject(report, where, str(e), on_malformed)
    if oasst:
        trees, tree_report = flatten_message_trees(oasst, on_malformed)
        out.extend(trees)
        report.add(tree_report)
    report.conversations = len(out)
    return out, report


def _reject(report: LoadReport, where: str, reason: str, on_malformed: str) -> None:
    if on_malformed == "error":
        raise DataError(f"{where}: malformed conversation: {reason} (data.on_malformed=skip "
                        f"skips and counts these)")
    report.malformed[reason] += 1
    if len(report.malformed_where) < 10:
        report.malformed_where.append(f"{where}: {reason}")


def flatten_message_trees(rows: list[tuple[str, dict]], on_malformed: Literal["skip", "error"] = "skip",
                          ) -> tuple[list[Conversation], LoadReport]:
    """OpenAssistant trees -> one conversation per tree, along the best-ranked path.

    From the root (a prompter message with no parent), each step takes the reply with the lowest
    `rank` (0 is best); unranked replies come after ranked ones, in file order. Deleted messages
    (`deleted: true`) and ones reviewers rejected (`review_result: false`) are never taken, nor
    anything below them. The path stops at a message without eligible replies; an unanswered
    final prompter turn is dropped like any trailing user turn.
    """
    report = LoadReport()
    children: dict[object, list[tuple[int, str, dict]]] = collections.defaultdict(list)
    roots: list[tuple[str, dict]] = []
    for order, (where, row) in enumerate(rows):
        if row.get("deleted") or row.get("review_result") is False:
            report.oasst_messages_skipped += 1
            continue
        if row.get("parent_id") is None:
            roots.append((where, row))
        else:
            children[row["parent_id"]].append((order, where, row))
    out = []
    for where, root in roots:
        report.oasst_trees += 1
        path, node = [root], root
        while children.get(node.get("message_id")):
            replies = children[node["message_id"]]
            _, _, node = min(replies, key=lambda r: (r[2].get("rank") is None, r[2].get("rank") or 0, r[0]))
            path.append(node)
        try:
            out.append(_validated([(m.get("role"), m.get("text")) for m in path], OASST_ROLES,
                                  where, report))
        except _Malformed as e:
            _reject(report, where, str(e), on_malformed)
    return out, report


def read_conversations(path: str | Path, fmt: str = "auto",
                       on_malformed: Literal["skip", "error"] = "skip") -> tuple[list[Conversation], LoadReport]:
    """Every conversation of one JSON/JSONL file, or of a `datasets` directory saved with
    `save_to_disk` (its `train` split when it holds several)."""
    path = Path(path)
    if path.is_dir():
        rows = ((f"{path}[row {i}]", row) for i, row in enumerate(_load_from_disk(path)))
    else:
        rows = ((f"{path}:{line}", value) for line, value in json_rows(path))
    conversations, report = conversations_from_rows(rows, fmt, on_malformed)
    if not conversations:
        raise DataError(f"{path}: no usable conversations ({dict(report.malformed) or 'empty'})")
    return conversations, report


def _load_from_disk(path: Path):
    import datasets
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (has {sorted(ds)})")
        ds = ds["train"]
    return iter(ds)
