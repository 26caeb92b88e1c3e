"""Judge fakes for the eval tests: the data_gen fake OpenAI server (imported, not copied) with a
scripted judge policy, and the judge config pointing at it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_eval_fake_openai", REPO / "tests" / "data_gen" / "fake_openai.py")
fake_openai = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_openai)

CATEGORIES = ("Grammarly", "Gmail", "Wikipedia")
_ANSWERS = re.compile(r"### Answer A\n(.*)\n\n### Answer B\n(.*)\n\nYou may explain", re.DOTALL)


class ScriptedJudge:
    """A judge policy for the fake server; records every (answer A, answer B) it was shown."""

    def __init__(self, policy):
        self.policy = policy
        self.shown: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, prompt: str) -> tuple[str, str]:
        a, b = _ANSWERS.search(prompt).groups()
        with self._lock:
            self.shown.append((a, b))
        return f"Both answers were read carefully.\nVerdict: {self.policy(a, b)}", "stop"


def always_a(a: str, b: str) -> str:
    return "A"


def prefers_good(a: str, b: str) -> str:
    """Prefers the answer marked GOOD wherever it is shown; a tie when neither or both are."""
    if ("GOOD" in a) == ("GOOD" in b):
        return "tie"
    return "A" if "GOOD" in a else "B"


def by_digest(a: str, b: str) -> str:
    """A verdict that is a fixed function of the two answers, for answers no rule can grade
    (a random model's): a digest of the unordered pair picks one of four cases, so each kind
    of outcome occurs: the answer that sorts first wins (in both orders), the other one wins,
    a tie, or always "A" (position-biased: its two orders disagree). Equal answers tie."""
    if a == b:
        return "tie"
    first, second = sorted((a, b))
    case = hashlib.sha256(f"{first}\0{second}".encode()).digest()[0] % 4
    if case == 2:
        return "tie"
    if case == 3:
        return "A"
    return "A" if (first if case == 0 else second) == a else "B"


def write_judge_config(path: Path, url: str, **judge) -> Path:
    settings = {"model": "fake-judge", "api": "chat", "base_url": url, "max_concurrency": 4, "max_retries": 1,
                "max_connect_retries": 0, "backoff_initial_s": 0.01, "backoff_max_s": 0.02, "timeout_s": 5.0, **judge}
    path.write_text(json.dumps({"judge": settings, "sampling": {"temperature": 0.0, "max_tokens": 64},
                                "pairwise": {"bootstrap_samples": 500}}))
    return path
