"""Conversations rendered the way the model was trained: what `chat` and `/v1/chat/completions`
send the model.

A conversation goes through the run's chat template (`data.template`, rendered by
`alpaca_jax.data.chat.render_prompt`, the same text training saw). Alpaca was trained on single
turns and its template refuses more; for a multi-turn chat with an Alpaca model, the earlier
turns are written as instruction/response pairs after the preamble (or the system prompt in its
place), ending with an open `### Response:`. One user turn is exactly the Alpaca prompt.
"""

from __future__ import annotations

from alpaca_jax.data.chat import render_prompt
from alpaca_jax.data.records import DataError
from alpaca_jax.data.templates import PROMPT_NO_INPUT
from alpaca_jax.errors import UserError

DEFAULT_SYSTEM = PROMPT_NO_INPUT.split("\n\n")[0]  # "Below is an instruction that describes a task. ..."


class ConversationError(UserError, ValueError):
    """A conversation that cannot be rendered (no user turn last, unknown role, ...)."""


def conversation_prompt(messages: list[dict[str, str]], template: str = "alpaca", tokenizer=None) -> str:
    """[{role, content}, ...] (an optional system turn first, then user/assistant alternating,
    the last one user) -> the prompt text, generation prompt included."""
    roles = [m.get("role") for m in messages]
    for role in roles:
        if role not in ("system", "user", "assistant"):
            raise ConversationError(f"unknown message role {role!r} (system, user or assistant)")
    if template == "alpaca" and roles.count("user") > 1:
        return _alpaca_multi_turn(messages)
    try:
        return render_prompt(messages, template, tokenizer)
    except (ValueError, DataError) as e:
        raise ConversationError(str(e)) from None


def _alpaca_multi_turn(messages: list[dict[str, str]]) -> str:
    system = messages[0]["content"] if messages[0]["role"] == "system" else DEFAULT_SYSTEM
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if len(body) % 2 == 0 or any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(body)):
        raise ConversationError("messages must alternate user/assistant after an optional system "
                                "turn and end with a user turn")
    parts = [f"### Instruction:\n{m['content']}\n\n### Response:" if m["role"] == "user"
             else f"{m['content']}\n\n" for m in body]  # a response as the model wrote it
    return system + "\n\n" + "".join(parts)
