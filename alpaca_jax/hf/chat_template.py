"""The chat template an export ships: the Alpaca prompt as Jinja, so chat servers prompt like training.

Servers that speak the OpenAI chat protocol (`transformers serve`, vLLM, TGI, Ollama's importer)
turn a list of messages into a prompt with the tokenizer's `chat_template`. Without one they
refuse chat requests; with a generic one they would prompt the model in a format it never saw.
This renders exactly `alpaca_jax.data.templates` (the strings are imported, not retyped):

- one `user` message is the instruction; an optional leading `system` message replaces the
  preamble ("Below is an instruction ... completes the request.") and is followed by the same
  blank line;
- the Alpaca `input` field is the template variable `input` (`apply_chat_template(..., input=...)`,
  or `chat_template_kwargs: {"input": ...}` in a request to `transformers serve` or vLLM); a
  non-empty one (even whitespace only, as the original's `input != ""`) selects the with-input
  template, exactly as `alpaca_prompt` does;
- `### Response:` is the generation prompt; an `assistant` message after the user's renders the
  whole training example, the response then EOS;
- BOS leads the text iff the run added BOS to its examples (`tokenizer.add_bos`); the template is
  tokenized with `add_special_tokens=False`, so the BOS must be in the text.

Multi-turn conversations are refused with an error naming the rule: an Alpaca run saw one
instruction per example, and concatenating earlier turns would prompt it in a format it was never
trained on. A conversation-trained run (`data.template` vicuna_v1.1 or koala) gets
`role_colon_chat_template`, the same format as `alpaca_jax.data.chat`; a run trained with the
tokenizer's own `chat_template` keeps it.
"""

from __future__ import annotations

import json

from alpaca_jax.data.prompt import ALTERNATE
from alpaca_jax.data.templates import INSTRUCTION_HEADER, PROMPT_NO_INPUT, PROMPT_WITH_INPUT, SINGLE_TURN_ONLY


def _split(template: str) -> tuple[str, str]:
    """(preamble, the rest) of an Alpaca template: the preamble is what a system message replaces."""
    preamble, _, rest = template.partition(INSTRUCTION_HEADER)
    if not rest or not preamble.endswith("\n\n"):
        raise AssertionError(f"unexpected Alpaca template layout: {template!r}")
    return preamble, rest


def _literal(text: str) -> str:
    """A Jinja string literal (JSON escapes are Jinja escapes for the ASCII text of the templates)."""
    return json.dumps(text)


def alpaca_chat_template(add_bos: bool) -> str:
    """The Jinja chat template for a run trained on Alpaca prompts (see the module docstring)."""
    preamble_input, rest_input = _split(PROMPT_WITH_INPUT)
    preamble_plain, rest_plain = _split(PROMPT_NO_INPUT)
    # The instruction and input slots, cut out of the Python templates so the literal text
    # between them (the headers, blank lines and "### Response:") is theirs, byte for byte.
    before_input, after_input = rest_input.split("{instruction}")[1].split("{input}")
    response_header = rest_plain.split("{instruction}")[1]
    if not response_header.endswith("### Response:") or not after_input == response_header:
        raise AssertionError("the two Alpaca templates no longer end alike")
    return "".join([
        "{#- Alpaca prompt format, as alpaca-jax trained this model (alpaca_jax/hf/chat_template.py) -#}\n",
        "{%- set ns = namespace(system=none, user=none, assistant=none) -%}\n",
        "{%- for message in messages -%}\n",
        # OpenAI content parts (what `transformers serve` passes) are joined back into one text.
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}\n",
        "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
        " | map(attribute='text') | join('') -%}{%- endif -%}\n",
        "{%- if message['role'] == 'system' and loop.first -%}{%- set ns.system = text -%}\n",
        "{%- elif message['role'] == 'user' and ns.user is none -%}{%- set ns.user = text -%}\n",
        "{%- elif message['role'] == 'assistant' and ns.user is not none and loop.last -%}"
        "{%- set ns.assistant = text -%}\n",
        "{%- else -%}{{- raise_exception(", _literal(SINGLE_TURN_ONLY), ") -}}{%- endif -%}\n",
        "{%- endfor -%}\n",
        "{%- if ns.user is none -%}{{- raise_exception(", _literal(SINGLE_TURN_ONLY), ") -}}{%- endif -%}\n",
        # `alpaca_prompt` takes the with-input template for any non-empty input (the original's rule).
        "{%- set has_input = input is defined and input is string and input != '' -%}\n",
        "{{- bos_token -}}\n" if add_bos else "",
        "{%- if ns.system is not none -%}{{- ns.system + ", _literal("\n\n"), " -}}\n",
        "{%- elif has_input -%}{{- ", _literal(preamble_input), " -}}\n",
        "{%- else -%}{{- ", _literal(preamble_plain), " -}}{%- endif -%}\n",
        "{{- ", _literal(INSTRUCTION_HEADER), " + ns.user -}}\n",
        "{%- if has_input -%}{{- ", _literal(before_input), " + input -}}{%- endif -%}\n",
        "{%- if ns.assistant is not none or add_generation_prompt -%}{{- ",
        _literal(response_header), " -}}{%- endif -%}\n",
        "{%- if ns.assistant is not none -%}{{- ns.assistant + eos_token -}}{%- endif -%}\n",
    ])


def role_colon_chat_template(system: str, user: str, assistant: str, add_bos: bool) -> str:
    """Jinja for the Vicuna-shaped formats of `alpaca_jax.data.chat` (vicuna_v1.1, koala):
    `SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:`, the words imported from there, so
    `apply_chat_template(..., add_generation_prompt=True)` gives `render_prompt`'s text."""
    return "".join([
        "{#- ", user, "/", assistant, " chat format, as alpaca-jax trained this model (alpaca_jax/data/chat.py) -#}\n",
        "{%- if messages and messages[0]['role'] == 'system' -%}\n",
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}\n",
        "{%- else -%}{%- set system = ", _literal(system), " -%}{%- set turns = messages -%}{%- endif -%}\n",
        "{{- bos_token -}}\n" if add_bos else "",
        "{{- system + ' ' -}}\n",
        "{%- for message in turns -%}\n",
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}\n",
        "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
        " | map(attribute='text') | join('') -%}{%- endif -%}\n",
        "{%- if message['role'] == 'user' and loop.index0 % 2 == 0 -%}{{- ", _literal(user + ": "),
        " + text + ' ' -}}\n",
        "{%- elif message['role'] == 'assistant' and loop.index0 % 2 == 1 -%}{{- ", _literal(assistant + ": "),
        " + text + eos_token -}}\n",
        "{%- else -%}{{- raise_exception(", _literal(ALTERNATE), ") -}}{%- endif -%}\n",
        "{%- endfor -%}\n",
        "{%- if add_generation_prompt -%}{{- ", _literal(assistant + ":"), " -}}{%- endif -%}\n",
    ])
