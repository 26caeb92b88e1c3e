"""Chat templates: a conversation rendered to text, with the character spans the loss covers.

Rendering produces text, not tokens: `tokenize.py` tokenizes the whole rendered text once (as
the original recipes did) and turns the spans into a token mask through the tokenizer's offset
mapping. A span covers one assistant turn's content plus its end-of-turn marker; everything
else (system prompt, user turns, role headers, the separators around them) carries no loss.

Templates, by name (`data.template`):
- `alpaca`: the Stanford Alpaca prompt (templates.py) as a single-turn chat: the user turn is
  the instruction (its `input`, if any, goes in the `### Input:` block), then the response and
  EOS. A system turn replaces the preamble ("Below is an instruction ..."), as in the chat
  template an export ships.
- `vicuna_v1.1`: FastChat's `vicuna_v1.1` (sep_style ADD_COLON_TWO, sep " ", sep2 EOS):
  `SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>`, with FastChat's default system
  message when the conversation has none.
- `koala`: the same shape with Koala's words, as EasyLM serves Koala:
  `BEGINNING OF CONVERSATION: USER: q GPT: a</s>USER: q2 GPT: a2</s>`.
- `tokenizer`: the `chat_template` (Jinja) of the local HF tokenizer. It is rendered once per
  prefix of the conversation, so each assistant turn's span is exact without `{% generation %}`
  markers: the turn's text is what the template adds between "the conversation so far plus the
  generation prompt" and "the conversation through this turn"; its span runs from the content
  to the first special token after it (the template's end-of-turn), inclusive. A template
  whose renderings are not prefixes of each other (e.g. one that rewrites earlier turns) is
  refused. A leading BOS the template writes is removed: BOS is added as an id, once, as for
  every template (`tokenizer.add_bos`).

In the non-Alpaca templates a user turn with an Alpaca `input` reads `instruction\\n\\ninput`.
`ChatTemplate.prompt` gives the text a model sees at inference (a conversation ending with a
user turn, generation prompt included); training renders are exactly that text followed by the
assistant turn, so a model is prompted as it was trained. Callers go through the prompt owner
(prompt.py: shape checks, the multi-turn rule, BOS, the context). Not for tokenizing (tokenize.py).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from alpaca_jax.data.conversations import Conversation, Turn
from alpaca_jax.data.records import DataError
from alpaca_jax.data.templates import INSTRUCTION_HEADER, alpaca_prompt

TEMPLATES = ("alpaca", "vicuna_v1.1", "koala", "tokenizer")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
DEFAULT_EOS = "</s>"


@dataclasses.dataclass(frozen=True)
class Rendered:
    text: str
    loss_spans: tuple[tuple[int, int], ...]  # [start, end) characters of each assistant turn + end-of-turn
    exchange_ends: tuple[int, ...]           # character where each (user, assistant) exchange's text ends
    header_end: int                          # character where the first exchange's text starts


def _user_text(turn: Turn) -> str:
    # Alpaca's rule (it tests `input != ""`): any non-empty input, even whitespace, is shown.
    return f"{turn.content}\n\n{turn.input}" if turn.input != "" else turn.content


class ChatTemplate:
    """Base: `render` for training, `prompt` for inference."""
    name = ""
    multi_turn = True  # trained on several exchanges per example (data/prompt.py enforces it)

    def render(self, conversation: Conversation) -> Rendered:
        raise NotImplementedError

    def prompt(self, conversation: Conversation) -> str:
        """Text of `conversation` (ending with a user turn) plus the generation prompt."""
        raise NotImplementedError


class AlpacaTemplate(ChatTemplate):
    name = "alpaca"
    multi_turn = False  # one instruction per example, as Stanford Alpaca trained

    def __init__(self, eos_token: str = DEFAULT_EOS):
        self.eos_token = eos_token

    def _single_user(self, conversation: Conversation, turns_expected: int) -> Turn:
        body = [t for t in conversation.turns if t.role != "system"]
        if len(body) != turns_expected:
            raise DataError(f"{conversation.where or 'conversation'}: the alpaca template is single-turn, "
                            f"this conversation has {len(body)} turns; use data.template=vicuna_v1.1 "
                            f"or tokenizer for multi-turn data")
        return body[0]

    def _prompt(self, conversation: Conversation, user: Turn) -> str:
        prompt = alpaca_prompt(user.content, user.input)
        if conversation.system is None:
            return prompt
        # A system turn replaces the preamble, before the same blank line (as the exported
        # chat template does, alpaca_jax/hf/chat_template.py).
        return conversation.system + "\n\n" + prompt[prompt.index(INSTRUCTION_HEADER):]

    def render(self, conversation: Conversation) -> Rendered:
        user = self._single_user(conversation, 2)
        prompt = self._prompt(conversation, user)
        text = prompt + conversation.turns[-1].content + self.eos_token
        return Rendered(text, ((len(prompt), len(text)),), (len(text),), 0)

    def prompt(self, conversation: Conversation) -> str:
        return self._prompt(conversation, self._single_user(conversation, 1))


class VicunaTemplate(ChatTemplate):
    """FastChat `vicuna_v1.1`; `eos_token` is sep2 (`</s>` for LLaMA tokenizers). Koala's
    format is the same shape with its own preamble and role names."""
    name = "vicuna_v1.1"
    system, user, assistant = VICUNA_SYSTEM, "USER", "ASSISTANT"

    def __init__(self, eos_token: str = DEFAULT_EOS):
        self.eos_token = eos_token

    def _head(self, conversation: Conversation) -> str:
        system = conversation.system
        return (self.system if system is None else system) + " "

    def render(self, conversation: Conversation) -> Rendered:
        text = self._head(conversation)
        header_end, spans, ends = len(text), [], []
        for user, assistant in conversation.exchanges:
            text += f"{self.user}: {_user_text(user)} {self.assistant}: "
            start = len(text)
            text += assistant.content + self.eos_token
            spans.append((start, len(text)))
            ends.append(len(text))
        return Rendered(text, tuple(spans), tuple(ends), header_end)

    def prompt(self, conversation: Conversation) -> str:
        done = Conversation(conversation.turns[:-1], conversation.where)
        text = self.render(done).text if done.exchanges else self._head(done)
        return text + f"{self.user}: {_user_text(conversation.turns[-1])} {self.assistant}:"


class KoalaTemplate(VicunaTemplate):
    """Koala's chat format, as EasyLM serves it (docs/koala.md: prepend `BEGINNING OF
    CONVERSATION: `, user `USER: q `, model `GPT:` ... `</s>`)."""
    name = "koala"
    system, user, assistant = "BEGINNING OF CONVERSATION:", "USER", "GPT"


class TokenizerTemplate(ChatTemplate):
    """The local HF tokenizer's Jinja `chat_template`, rendered prefix by prefix."""
    name = "tokenizer"

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"data.template=tokenizer, but the tokenizer "
                            f"{getattr(tokenizer, 'name_or_path', '') or ''} has no chat_template")
        self.tokenizer = tokenizer
        specials = set(tokenizer.all_special_tokens)
        specials |= {str(t) for t in tokenizer.added_tokens_decoder.values() if t.special}
        self.specials = sorted(specials - {""})

    def _apply(self, turns: Sequence[Turn], generation_prompt: bool, where: str) -> str:
        messages = [{"role": t.role, "content": _user_text(t) if t.role == "user" else t.content} for t in turns]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as e:  # Jinja raises its own errors (e.g. `raise_exception` in templates)
            raise DataError(f"{where or 'conversation'}: the tokenizer's chat_template failed: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        bos = self.tokenizer.bos_token
        return text[len(bos):] if bos and text.startswith(bos) else text

    def _end_of_turn(self, text: str, content_end: int) -> int:
        found = [(text.find(s, content_end), s) for s in self.specials]
        found = [(i, s) for i, s in found if i >= 0]
        if not found:  # no end-of-turn token: the turn's own text, trailing whitespace excluded
            return content_end + len(text[content_end:].rstrip())
        i, s = min(found, key=lambda f: (f[0], -len(f[1])))
        return i + len(s)

    def _system_alone(self, turns: Sequence[Turn], where: str) -> str:
        try:
            return self._apply(turns, False, where)
        except DataError:  # some templates insist on a user turn
            return ""

    def render(self, conversation: Conversation) -> Rendered:
        turns, where = conversation.turns, conversation.where
        head = 1 if conversation.system is not None else 0
        text = self._system_alone(turns[:head], where) if head else ""
        header_end, spans, ends = len(text), [], []
        for k in range(head, len(turns), 2):
            before = self._apply(turns[:k + 1], True, where)
            full = self._apply(turns[:k + 2], False, where)
            if k == head and not before.startswith(text):
                text, header_end = "", 0  # the system turn renders only beside a user turn
            if not (before.startswith(text) and full.startswith(before)):
                raise DataError(f"{where or 'conversation'}: the tokenizer's chat_template does not "
                                f"render a conversation as a prefix of its continuation, so turn "
                                f"boundaries are not defined; use data.template=vicuna_v1.1")
            content = turns[k + 1].content
            at = full.find(content, len(before))
            if at < 0:  # templates that strip the content (LLaMA-2's) still contain it stripped
                content = content.strip()
                at = full.find(content, len(before))
            if at < 0:
                raise DataError(f"{where or 'conversation'}: the chat_template does not render "
                                f"assistant turn {(k - head) // 2 + 1} verbatim")
            spans.append((at, self._end_of_turn(full, at + len(content))))
            ends.append(len(full))
            text = full
        return Rendered(text, tuple(spans), tuple(ends), header_end)

    def prompt(self, conversation: Conversation) -> str:
        return self._apply(conversation.turns, True, conversation.where)


def chat_template(name: str, tokenizer=None) -> ChatTemplate:
    """The template `name`, using the tokenizer's EOS as end-of-turn (`</s>` without one)."""
    eos = getattr(tokenizer, "eos_token", None) or DEFAULT_EOS
    if name == "alpaca":
        return AlpacaTemplate(eos)
    if name == "vicuna_v1.1":
        return VicunaTemplate(eos)
    if name == "koala":
        return KoalaTemplate(eos)
    if name == "tokenizer":
        if tokenizer is None:
            raise DataError("data.template=tokenizer needs tokenizer.path (a local HF tokenizer with a chat_template)")
        return TokenizerTemplate(tokenizer)
    raise DataError(f"unknown chat template '{name}' (known: {', '.join(TEMPLATES)})")
