"""The LLM client's configuration: which server, how to retry, what a request may cost.

One frozen dataclass per concern, shared by every caller of an OpenAI-compatible model (the
generator's teacher in `data_gen`, the pairwise judge in `alpaca_jax.eval`), each built from its
own YAML section by `alpaca_jax.configlib`. JAX-free.

`RequestSampling` is the sampling block sent with a request to the *server* (temperature,
top_p, max_tokens, penalties); it is not `alpaca_jax.infer.SamplingConfig`, which samples from
our own model's logits.

Not here: what the values do (client.py, budget.py), the pipelines' own blocks (data_gen/config.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from alpaca_jax.configlib import ConfigError

__all__ = ["TeacherConfig", "RequestSampling", "ModelPrice", "BudgetConfig"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class TeacherConfig:
    model: str = "gpt-3.5-turbo-instruct"
    api: Literal["chat", "completions"] = "completions"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 120.0
    max_concurrency: int = 8
    max_retries: int = 8
    # A refused connection or an unknown host before the teacher has answered once in this run
    # is most likely a wrong URL or a server that is down: retry it only this often, so a dead
    # endpoint ends the run in seconds. Once the teacher has answered, max_retries applies.
    max_connect_retries: int = 2
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    # online: one HTTP request per prompt; batch: each round goes through the Batch API
    # (data_gen/batch.py; the eval judge is online only)
    mode: Literal["online", "batch"] = "online"

    def __post_init__(self):
        _require(self.max_concurrency >= 1, "teacher.max_concurrency must be >= 1")
        _require(self.max_retries >= 0, "teacher.max_retries must be >= 0")
        _require(self.max_connect_retries >= 0, "teacher.max_connect_retries must be >= 0")
        _require(self.timeout_s > 0, "teacher.timeout_s must be > 0")
        _require(0 < self.backoff_initial_s <= self.backoff_max_s,
                 "teacher.backoff_initial_s must be > 0 and <= teacher.backoff_max_s")


# Defaults are Self-Instruct's released settings; the original's top_p=0 beside temperature 0 is
# written as 1.0 here: greedy either way, and vLLM rejects top_p=0.
@dataclass(frozen=True)
class RequestSampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 3072
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def check(self, name: str) -> None:
        _require(self.temperature >= 0, f"sampling.{name}.temperature must be >= 0")
        _require(0 < self.top_p <= 1, f"sampling.{name}.top_p must be in (0, 1]")
        _require(self.max_tokens >= 1, f"sampling.{name}.max_tokens must be >= 1")

    def params(self) -> dict[str, float | int]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty}


@dataclass(frozen=True)
class ModelPrice:
    prompt_per_million: float = 0.0
    completion_per_million: float = 0.0


@dataclass(frozen=True)
class BudgetConfig:
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    max_requests: int | None = None       # completed (paid) requests, garbage included; None = no cap
    prices: dict[str, ModelPrice] = field(default_factory=dict)

    def __post_init__(self):
        _require(self.max_requests is None or self.max_requests > 0,
                 "budget.max_requests must be > 0 or null")
        _require(self.max_tokens is None or self.max_tokens > 0, "budget.max_tokens must be > 0 or null")
        _require(self.max_cost_usd is None or self.max_cost_usd > 0,
                 "budget.max_cost_usd must be > 0 or null")
