"""The reference heuristics that drop generated tasks, each switchable and each named.

Every check returns the *reason* a candidate is dropped (a short snake_case name that the
report counts) or None. Self-Instruct and Alpaca apply the same rules: instructions of 3 words
or fewer or over 150, keywords a text-only model cannot act on (images, files, plots...),
"Write a program" (the model over-produced it), a punctuation or non-ASCII first character,
and instances that are empty, echo their input, or end in a colon (cut-off generations).

Not here: near-duplicate removal (dedup.py) and parsing (prompts.py).
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

from data_gen.config import FilterConfig

__all__ = ["instruction_drop_reason", "instance_drop_reason", "conflicting_instances", "REASONS"]

REASONS = ("too_short", "too_long", "blacklisted_keyword", "banned_prefix", "punctuation_start",
           "non_ascii_start", "empty_output", "input_equals_output", "truncated")


@lru_cache(maxsize=256)
def _keyword_pattern(words: tuple[str, ...]) -> re.Pattern | None:
    if not words:
        return None
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def instruction_drop_reason(instruction: str, config: FilterConfig) -> str | None:
    text = instruction.strip()
    words = len(text.split())
    if words < config.min_words or not text:
        return "too_short"
    if words > config.max_words:
        return "too_long"
    pattern = _keyword_pattern(config.blacklist)
    if pattern is not None and pattern.search(text):
        return "blacklisted_keyword"
    if any(text.startswith(prefix) for prefix in config.banned_prefixes):
        return "banned_prefix"
    if config.drop_punctuation_start and text[0] in string.punctuation:
        return "punctuation_start"
    if config.drop_non_ascii_start and not text[0].isascii():
        return "non_ascii_start"
    return None


def instance_drop_reason(task_input: str, task_output: str, config: FilterConfig) -> str | None:
    if config.drop_empty_output and not task_output.strip():
        return "empty_output"
    if config.drop_input_equals_output and task_input.strip() == task_output.strip():
        return "input_equals_output"
    # An input or output ending in ':' announces content that never came: a cut-off generation.
    if config.drop_truncated and (task_input.strip().endswith(":") or task_output.strip().endswith(":")):
        return "truncated"
    return None


def conflicting_instances(instances: list[tuple[str, str]]) -> bool:
    """Self-Instruct drops a task whose instances give one non-empty input two outputs."""
    seen: dict[str, str] = {}
    for task_input, task_output in instances:
        if task_input and seen.setdefault(task_input, task_output) != task_output:
            return True
    return False
