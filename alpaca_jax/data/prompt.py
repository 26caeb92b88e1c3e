"""The prompt owner: a conversation -> the exact token ids training saw before the answer.

Every consumer builds its prompt here, from the run's chat template (`data.template`): `chat`,
`serve` (chat completions), `respond`, `eval` (generation), and the chat-template export checks
itself against it. Perplexity and training tokenize whole conversations through the same
template objects (tokenize.py), of which this prompt is the exact prefix.

The rules, each decided once:
- **Shape**: an optional system turn, then user/assistant alternating, ending with a user turn
  (`check_messages`). Roles are system, user, assistant.
- **Multi-turn**: a template says whether it was trained on several exchanges
  (`ChatTemplate.multi_turn`). Alpaca was not: a conversation with earlier exchanges is refused
  with `SINGLE_TURN_ONLY` (the exported Jinja template raises the same words), never rendered
  in a format the model never saw.
- **BOS**: `[BOS] + tokenizer(text, add_special_tokens=False)` when the run added BOS
  (`tokenizer.add_bos`) and the tokenizer has one (`with_bos`); nothing else adds it.
- **Context**: a prompt must leave room for one generated token (`check_fits`).
- **Alpaca rows** (`{instruction, input}`) are one user turn whose `input` the template places
  (`alpaca_messages`): the Alpaca prompt for an Alpaca run, `instruction\\n\\ninput` as the user
  text for a conversation template, as training rendered such rows.

Not here: the templates' text (chat.py, templates.py), decoding (alpaca_jax/infer).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from alpaca_jax.data.chat import ChatTemplate, chat_template
from alpaca_jax.data.conversations import Conversation, Turn
from alpaca_jax.data.records import DataError
from alpaca_jax.data.templates import SINGLE_TURN_ONLY
from alpaca_jax.errors import UserError

__all__ = ["PromptError", "PromptTooLongError", "SINGLE_TURN_ONLY", "ALTERNATE", "alpaca_messages",
           "check_messages", "render_prompt", "encode_prompt", "encode_text", "with_bos", "check_fits"]

ROLES = ("system", "user", "assistant")
ALTERNATE = ("messages must be an optional system message, then user and assistant messages "
             "alternating (a prompt must end with a user turn)")


class PromptError(UserError, ValueError):
    """A prompt that cannot be built (bad roles, wrong shape, empty); one line says why."""


class PromptTooLongError(PromptError):
    """The prompt leaves no room in the model's context for a generated token."""


def alpaca_messages(instruction: str, input: str = "") -> list[dict[str, str]]:  # noqa: A002 - Alpaca's name
    """An Alpaca row as a one-turn conversation (the template decides where `input` goes)."""
    return [{"role": "user", "content": instruction, "input": input}]


def _as_turns(messages: Sequence[Mapping[str, str] | Turn]) -> tuple[Turn, ...]:
    turns = []
    for m in messages:
        if isinstance(m, Turn):
            turns.append(m)
            continue
        role = m.get("role")
        if role not in ROLES:
            raise PromptError(f"unknown message role {role!r} (system, user or assistant)")
        turns.append(Turn(role, m["content"], m.get("input", "") or ""))  # type: ignore[arg-type]
    return tuple(turns)


def check_messages(messages: Sequence[Mapping[str, str] | Turn],
                   template: ChatTemplate | None = None) -> tuple[Turn, ...]:
    """The turns of `messages`, checked for shape and, given a template, for its multi-turn rule."""
    turns = _as_turns(messages)
    body = turns[1:] if turns and turns[0].role == "system" else turns
    if not body or len(body) % 2 == 0 or any(t.role != ("user" if i % 2 == 0 else "assistant")
                                              for i, t in enumerate(body)):
        raise PromptError(ALTERNATE)
    if template is not None and not template.multi_turn and len(body) > 1:
        raise PromptError(SINGLE_TURN_ONLY)
    return turns


def _template(template: str | ChatTemplate, tokenizer) -> ChatTemplate:
    if isinstance(template, ChatTemplate):
        return template
    try:
        return chat_template(template, tokenizer)
    except DataError as e:
        raise PromptError(str(e)) from None


def render_prompt(messages: Sequence[Mapping[str, str] | Turn], template: str | ChatTemplate,
                  tokenizer=None) -> str:
    """The inference prompt text for OpenAI-style `messages` ({role, content[, input]}),
    generation prompt included: exactly the text training rendered before the answer."""
    template = _template(template, tokenizer)
    turns = check_messages(messages, template)
    try:
        return template.prompt(Conversation(turns))
    except DataError as e:
        raise PromptError(str(e)) from None


def with_bos(ids: Sequence[int], tokenizer, add_bos: bool) -> list[int]:
    """`ids` behind the BOS id when the run added BOS to its examples and the tokenizer has one."""
    bos = tokenizer.bos_token_id
    return ([bos] if add_bos and bos is not None else []) + list(ids)


def check_fits(ids: Sequence[int], max_len: int | None) -> None:
    """A prompt must hold a token and leave at least one of `max_len` for the answer."""
    if not ids:
        raise PromptError("the prompt is empty (and the model takes no BOS token)")
    if max_len is not None and len(ids) >= max_len:
        raise PromptTooLongError(f"the prompt has {len(ids)} tokens; the model's context is "
                                 f"{max_len} tokens, and at least one must be left to generate")


def encode_text(text: str, tokenizer, add_bos: bool = True, max_len: int | None = None) -> list[int]:
    """Ids of an already formatted prompt (a raw completion): BOS as in training, no other specials."""
    ids = with_bos(tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer, add_bos)
    check_fits(ids, max_len)
    return ids


def encode_prompt(messages: Sequence[Mapping[str, str] | Turn], template: str | ChatTemplate,
                  tokenizer, add_bos: bool = True, max_len: int | None = None) -> list[int]:
    """Prompt token ids as training saw them before the answer: BOS (if `add_bos` and the
    tokenizer has one), then the rendered text tokenized without special-token insertion;
    with `max_len`, checked to leave room for an answer (`PromptTooLongError`)."""
    return encode_text(render_prompt(messages, template, tokenizer), tokenizer, add_bos, max_len)
