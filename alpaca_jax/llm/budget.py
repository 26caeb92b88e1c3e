"""Request, token and cost accounting, and the optional caps that stop a run cleanly.

Usage comes from the teacher's responses (`usage.prompt_tokens`, `usage.completion_tokens`),
including responses replayed from the journal, so a resumed run counts what was already spent
and a cap holds across restarts. Every completed request counts against `max_requests`,
garbage included: a teacher that answers only garbage reports 0 tokens but is still paid. Cost uses the per-model price table in the config (USD per
million tokens); a model without a price costs 0 unless a cost cap demands a price.

Not here: deciding what to do when the cap is hit (the pipelines stop issuing requests).
"""

from __future__ import annotations

import threading

from alpaca_jax.llm.config import BudgetConfig

__all__ = ["CapGate", "Budget"]


class CapGate:
    """The caps of a `BudgetConfig` over counts a subclass provides (`requests`, `total_tokens`,
    `cost_usd`), and the reservations that keep concurrent senders under `max_requests`."""

    def __init__(self, config: BudgetConfig):
        self.config = config
        self._in_flight = 0        # requests claimed by `reserve` and not yet recorded or released
        self._lock = threading.Lock()

    def reserve(self) -> bool:
        """Claim one request before sending it; False once a cap is reached.

        Requests in flight count against `max_requests`, so concurrency cannot overshoot it
        (token and cost caps can be overshot by what is in flight: usage is known only after)."""
        with self._lock:
            if self._exhausted(self._in_flight) is not None:
                return False
            self._in_flight += 1
            return True

    def release(self) -> None:
        """A reserved request ended without a completed response (not paid)."""
        with self._lock:
            self._in_flight -= 1

    def exhausted(self) -> str | None:
        """Why no further request may be sent, or None while within budget."""
        with self._lock:
            return self._exhausted(0)

    def _exhausted(self, in_flight: int) -> str | None:
        config, requests, tokens, cost = self.config, self.requests, self.total_tokens, self.cost_usd
        if config.max_requests is not None and requests + in_flight >= config.max_requests:
            return f"request budget reached ({requests} >= {config.max_requests})"
        if config.max_tokens is not None and tokens >= config.max_tokens:
            return f"token budget reached ({tokens} >= {config.max_tokens})"
        if config.max_cost_usd is not None and cost >= config.max_cost_usd:
            return f"cost budget reached (${cost:.4f} >= ${config.max_cost_usd})"
        return None


class Budget(CapGate):
    def __init__(self, config: BudgetConfig, model: str):
        super().__init__(config)
        self.model = model
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.requests = 0          # completed requests, replayed ones included

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost_usd(self) -> float:
        price = self.config.prices.get(self.model)
        if price is None:
            return 0.0
        return (self.prompt_tokens * price.prompt_per_million
                + self.completion_tokens * price.completion_per_million) / 1e6

    def record(self, prompt_tokens: int, completion_tokens: int, reserved: bool = False) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.requests += 1
            self._in_flight -= reserved
