"""Prompt builders and response parsers for both pipelines; pure functions of text.

Formats follow the papers' released generators so that a completions-style teacher continues
them the same way:

- Alpaca (Taori et al. 2023): a requirements preamble, then numbered demonstrations
  `###\\nk. Instruction: ...\\nk. Input:\\n...\\nk. Output:\\n...`, ending with the next
  number's `Instruction:`; the reply is split on `###`.
- Self-Instruct (Wang et al. 2022): "Come up with a series of tasks:" and a numbered list to
  continue; "Is it classification?" for stage 2; for stage 3, demonstration tasks that each show
  several instances with their own field names (`Sentence:`, `List:`, ...): output-first
  (`Class label:` then the input) for classification tasks, input-first (`Example 1`,
  `Example 2`, ... then `Output:`) for the rest, so the teacher writes several instances too.

The stage 2 examples are drawn from the seed pool itself, so a new seed pool (another language,
another domain) brings its own; the stage 3 demonstrations come from their own file
(`pipeline.instance_demos`), since a seed pool holds one instance per task. The instructions in
the prompts are our own wording; only the field layout follows the originals.

Not here: filtering (filters.py) and deciding what to send (the pipelines).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["SeedTask", "DemoTask", "Parsed", "ALPACA_PREAMBLE", "encode_alpaca_prompt", "parse_alpaca_response",
           "encode_bootstrap_prompt", "parse_bootstrap_response", "encode_classification_prompt",
           "parse_classification_response", "encode_instance_prompt", "parse_instances"]

ALPACA_PREAMBLE = """\
You are asked to come up with a set of {count} diverse task instructions. These task instructions \
will be given to a language model and we will evaluate the model for completing the instructions.

Here are the requirements:
1. Try not to repeat the verb for each instruction to maximize diversity.
2. The language used for the instructions should also be diverse: combine questions with \
imperative instructions.
3. The types of instructions should be diverse: open-ended generation, classification, editing, \
rewriting, brainstorming, question answering, and so on.
4. A language model must be able to complete the instruction. Do not ask for visual or audio \
output, and do not ask the assistant to take actions in the world.
5. The instructions should be in English and 1 to 2 sentences long.
6. Generate an appropriate input for the instruction when it needs one: a specific, realistic \
example of at most 100 words, not a placeholder. When no input is needed, write "<noinput>".
7. The output should be an appropriate response to the instruction and the input, under 100 words.

List of {count} tasks:
"""

_NO_INPUT = "<noinput>"


@dataclass(frozen=True)
class SeedTask:
    instruction: str
    input: str
    output: str
    is_classification: bool


@dataclass(frozen=True)
class DemoTask:
    """A stage 3 demonstration: a task and several (input, output) instances; each input keeps
    its task-specific field names, e.g. "Sentence: ...", and may be empty."""
    instruction: str
    instances: tuple[tuple[str, str], ...]
    is_classification: bool


@dataclass
class Parsed:
    """What a parser recovered: candidate tuples, and how many pieces it had to throw away."""
    items: list = field(default_factory=list)
    unparseable: int = 0   # pieces of the reply that do not have the expected shape
    truncated: int = 0     # the last piece of a reply cut by max_tokens


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# -- Alpaca ----------------------------------------------------------------------------------
def encode_alpaca_prompt(demos: list[SeedTask], count: int) -> str:
    prompt = ALPACA_PREAMBLE.format(count=count) + "\n"
    for k, task in enumerate(demos, start=1):
        instruction = _one_line(task.instruction).rstrip(":")
        prompt += (f"###\n{k}. Instruction: {instruction}\n{k}. Input:\n{task.input or _NO_INPUT}\n"
                   f"{k}. Output:\n{task.output}\n")
    prompt += f"###\n{len(demos) + 1}. Instruction:"
    return prompt


def parse_alpaca_response(text: str, num_demos: int, finish_reason: str | None,
                          drop_truncated: bool = True) -> Parsed:
    """Split a reply into (instruction, input, output) triples numbered num_demos+1, +2, ..."""
    first = num_demos + 1
    # Completions continue after "k. Instruction:"; chat models often restate it.
    if not re.match(rf"\s*{first}\.\s*Instruction:", text):
        text = f"{first}. Instruction:" + text
    pieces = [p for p in text.split("###") if p.strip()]
    parsed = Parsed()
    for i, piece in enumerate(pieces):
        if i == len(pieces) - 1 and finish_reason == "length" and drop_truncated:
            parsed.truncated += 1
            continue
        match = re.match(r"\s*(\d+)\.\s*Instruction:(.*?)\n\s*\1\.\s*Input:(.*?)\n\s*\1\.\s*Output:(.*)",
                         piece, flags=re.DOTALL)
        if match is None:
            parsed.unparseable += 1
            continue
        instruction = match.group(2).strip()
        task_input = match.group(3).strip()
        task_input = "" if task_input.lower() == _NO_INPUT else task_input
        parsed.items.append((instruction, task_input, match.group(4).strip()))
    return parsed


# -- Self-Instruct stage 1: bootstrap instructions ---------------------------------------------
def encode_bootstrap_prompt(instructions: list[str], classification: bool = False) -> str:
    if classification:
        prompt = ("Come up with a series of classification tasks. Try to specify the possible "
                  "output labels when possible.\n")
    else:
        prompt = "Come up with a series of tasks:\n"
    for k, instruction in enumerate(instructions, start=1):
        prompt += f"{k}. {_one_line(instruction).rstrip(':')}\n"
    prompt += f"{len(instructions) + 1}."
    return prompt


def parse_bootstrap_response(text: str, finish_reason: str | None, drop_truncated: bool = True) -> Parsed:
    """The numbered list a completion continues: the first item has no number of its own."""
    parsed = Parsed()
    pieces = re.split(r"\n\s*\d+\s?\.\s", "\n" + text if re.match(r"\s*\d+\s?\.\s", text) else text)
    pieces = [_one_line(p) for p in pieces]
    pieces = [p for p in pieces if p]
    for i, piece in enumerate(pieces):
        if i == len(pieces) - 1 and finish_reason == "length" and drop_truncated:
            parsed.truncated += 1
            continue
        parsed.items.append(piece)
    if not pieces:
        parsed.unparseable += 1
    return parsed


# -- Self-Instruct stage 2: is it a classification task? ---------------------------------------
CLASSIFICATION_HEADER = ("For each task, say whether it is a classification task: one whose answer "
                         "is picked from a small, fixed set of labels.\n\n")
INSTANCE_HEADER_CLASSIFICATION = (
    "Each task below is a classification task. For each of its possible class labels, write the "
    "label first and then an input that belongs to that label. When the task takes no input, "
    "just list the labels it can produce.\n\n")
INSTANCE_HEADER_GENERATION = (
    "Write examples for each task below, several of them when the task allows it: each example "
    "gives the input under the task's own field names, then the output. When a task needs no "
    "input, write the output directly.\n\n")


def encode_classification_prompt(examples: list[SeedTask], instruction: str) -> str:
    prompt = CLASSIFICATION_HEADER
    for task in examples:
        answer = "Yes" if task.is_classification else "No"
        prompt += f"Task: {_one_line(task.instruction)}\nIs it classification? {answer}\n\n"
    return prompt + f"Task: {_one_line(instruction)}\nIs it classification?"


def parse_classification_response(text: str) -> bool | None:
    answer = text.strip().lower()
    if answer.startswith("yes"):
        return True
    if answer.startswith("no"):
        return False
    return None


# -- Self-Instruct stage 3: instances ----------------------------------------------------------
def _demonstration(task: DemoTask) -> str:
    text = f"Task: {_one_line(task.instruction)}\n"
    if task.is_classification:
        for task_input, label in task.instances:
            text += f"Class label: {label.strip()}\n" + (f"{task_input.strip()}\n" if task_input.strip() else "")
    elif len(task.instances) == 1 and not task.instances[0][0].strip():
        text += f"Output: {task.instances[0][1].strip()}\n"
    else:
        for k, (task_input, task_output) in enumerate(task.instances, start=1):
            text += f"Example {k}\n" + (f"{task_input.strip()}\n" if task_input.strip() else "")
            text += f"Output: {task_output.strip()}\n"
    return text + "\n"


def encode_instance_prompt(demos: list[DemoTask], instruction: str, classification: bool) -> str:
    """Output-first for classification (labels before inputs, to avoid label imbalance),
    input-first for everything else, as in the paper; each demonstration shows all its instances."""
    header = INSTANCE_HEADER_CLASSIFICATION if classification else INSTANCE_HEADER_GENERATION
    shown = [task for task in demos if task.is_classification == classification]
    return header + "".join(_demonstration(task) for task in shown) + f"Task: {_one_line(instruction)}\n"


def _input_output(text: str) -> tuple[str, str]:
    parts = re.split(r"Output\s*\d*\s*:", text)
    if len(parts) > 1:
        task_input, task_output = parts[0].strip(), parts[1].strip()
    else:
        task_input, task_output = "", text.strip()
    # Several input/output pairs in one example: keep the first.
    task_output = re.split(r"Input\s*\d*\s*:", task_output)[0].strip()
    task_input = re.sub(r"^Input\s*\d*\s*:", "", task_input).strip()
    return task_input, task_output


def parse_instances(text: str, classification: bool, finish_reason: str | None,
                    drop_truncated: bool = True) -> Parsed:
    """(input, output) pairs from a stage 3 reply."""
    parsed = Parsed()
    if classification:
        if "Class label:" not in text:
            parsed.unparseable += 1
            return parsed
        for piece in text.split("Class label:")[1:]:
            label, _, rest = piece.strip().partition("\n")
            rest = re.sub(r"^Input\s*\d*\s*:", "", rest.strip()).strip()
            parsed.items.append((rest, label.strip()))
    elif re.search(r"Example\s?\d*\.?", text):
        for piece in re.split(r"Example\s?\d*\.?", text.strip()):
            if piece.strip():
                parsed.items.append(_input_output(piece))
    elif re.search(r"Output\s*\d*\s*:", text):
        parsed.items.append(_input_output(text))
    else:
        parsed.unparseable += 1
        return parsed
    if finish_reason == "length" and drop_truncated and parsed.items:
        parsed.items.pop()
        parsed.truncated += 1
    return parsed
