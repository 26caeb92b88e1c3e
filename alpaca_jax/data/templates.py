"""The Stanford Alpaca prompt templates (verbatim from the released `train.py`).

Two templates: one for instructions with an `input` field, one for those without. The model
sees the prompt and is trained to produce only the response that follows `### Response:`.
"""

from __future__ import annotations

INSTRUCTION_HEADER = "### Instruction:\n"   # what a system turn's text is placed before
# The multi-turn rule for Alpaca, in the words both the prompt owner (data/prompt.py) and the
# exported Jinja template (hf/chat_template.py) refuse a conversation with.
SINGLE_TURN_ONLY = ("this model was trained on single-turn Alpaca prompts: send an optional "
                    "system message, then one user message (and, to render a training example, "
                    "one assistant message)")

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - the Alpaca field name
    """The prompt for one example. As the original (`example.get("input", "") != ""`), any
    non-empty input, even whitespace only, takes the with-input template."""
    if input != "":
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)
