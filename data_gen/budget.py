"""Token and cost accounting, and the optional caps that stop a run cleanly.

Usage comes from the teacher's responses (`usage.prompt_tokens`, `usage.completion_tokens`),
including responses replayed from the journal, so a resumed run counts what was already spent
and a cap holds across restarts. Cost uses the per-model price table in the config (USD per
million tokens); a model without a price costs 0 unless a cost cap demands a price.

Not here: deciding what to do when the cap is hit (the pipelines stop issuing requests).
"""

from __future__ import annotations

import threading

from data_gen.config import BudgetConfig

__all__ = ["Budget"]


class Budget:
    def __init__(self, config: BudgetConfig, model: str):
        self.config = config
        self.model = model
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._lock = threading.Lock()

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

    def record(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def exhausted(self) -> str | None:
        """Why no further request may be sent, or None while within budget."""
        cap = self.config.max_tokens
        if cap is not None and self.total_tokens >= cap:
            return f"token budget reached ({self.total_tokens} >= {cap})"
        cap_usd = self.config.max_cost_usd
        if cap_usd is not None and self.cost_usd >= cap_usd:
            return f"cost budget reached (${self.cost_usd:.4f} >= ${cap_usd})"
        return None
