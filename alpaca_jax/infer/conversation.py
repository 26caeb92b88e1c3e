"""Conversations in the Alpaca template: what `chat` and `/v1/chat/completions` send the model.

Alpaca was trained on single turns. A conversation is rendered as the template's preamble (or
the caller's system prompt in its place) followed by each turn as an instruction/response pair,
ending with an open `### Response:`. One user turn with the default preamble is exactly the
Alpaca prompt the model was trained on.
"""

from __future__ import annotations

from alpaca_jax.data.templates import PROMPT_NO_INPUT

DEFAULT_SYSTEM = PROMPT_NO_INPUT.split("\n\n")[0]  # "Below is an instruction that describes a task. ..."


class ConversationError(ValueError):
    """A conversation that cannot be rendered (no user turn last, unknown role, ...)."""


def conversation_prompt(messages: list[dict[str, str]], system: str | None = None) -> str:
    """[{role, content}, ...] (roles system/user/assistant, the last one user) -> the prompt."""
    if not messages or messages[-1].get("role") != "user":
        raise ConversationError("the last message must have role 'user'")
    parts = []
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role == "system":
            system = content
        elif role == "user":
            parts.append(f"### Instruction:\n{content}\n\n### Response:")
        elif role == "assistant":
            if not parts or parts[-1].endswith("\n\n"):
                raise ConversationError("an assistant message must follow a user message")
            parts[-1] += f"{content}\n\n"  # as the model wrote it: right after "### Response:"
        else:
            raise ConversationError(f"unknown message role {role!r} (system, user or assistant)")
    joined = "".join(p if p.endswith("\n\n") else p + "\n\n" for p in parts[:-1]) + parts[-1]
    return f"{DEFAULT_SYSTEM if system is None else system}\n\n{joined}"
