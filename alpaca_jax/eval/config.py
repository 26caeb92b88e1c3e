"""The judge's configuration: which OpenAI-compatible model judges, with what prompt and budget.

The `judge` section is the LLM client's `TeacherConfig` (alpaca_jax/llm/config.py), the one the
generator's teacher uses too: same server settings, retries, concurrency; `sampling` and `budget`
are its `RequestSampling` and `BudgetConfig`. The shipped example, every key documented, is `configs/judge/default.yaml`.

Not here: asking the judge (judge.py) or scoring its verdicts (stats.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alpaca_jax.configlib import ConfigError, apply_overrides, build, load_yaml
from alpaca_jax.llm.config import BudgetConfig, RequestSampling, TeacherConfig

__all__ = ["PairwiseConfig", "JudgeConfig", "load_judge_config", "JUDGE_CONFIG_DIR", "PLACEHOLDERS"]

JUDGE_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "judge"
PLACEHOLDERS = ("{instruction}", "{output_a}", "{output_b}")


@dataclass(frozen=True)
class PairwiseConfig:
    prompt: str = "pairwise.txt"           # judge prompt file: a name in configs/judge/ or a path
    bootstrap_samples: int = 2000          # resamples of the instructions for the 95% interval
    seed: int = 0                          # bootstrap RNG seed

    def __post_init__(self):
        if self.bootstrap_samples < 1:
            raise ConfigError("pairwise.bootstrap_samples must be >= 1")

    @property
    def prompt_path(self) -> Path:
        path = Path(self.prompt).expanduser()
        return path if path.is_absolute() or path.is_file() else JUDGE_CONFIG_DIR / self.prompt


@dataclass(frozen=True)
class JudgeConfig:
    judge: TeacherConfig = field(default_factory=lambda: TeacherConfig(model="gpt-4o-mini", api="chat"))
    sampling: RequestSampling = field(default_factory=lambda: RequestSampling(temperature=0.0, max_tokens=512))
    pairwise: PairwiseConfig = field(default_factory=PairwiseConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def __post_init__(self):
        if self.budget.max_cost_usd is not None and self.judge.model not in self.budget.prices:
            raise ConfigError(f"budget.max_cost_usd needs budget.prices.{self.judge.model}")
        self.sampling.check("judge")


def load_judge_config(path: str | Path, overrides: list[str] = ()) -> JudgeConfig:
    """YAML file + `section.field=value` overrides -> JudgeConfig, the prompt file checked."""
    cfg = build(JudgeConfig, apply_overrides(load_yaml(path), list(overrides)))
    load_prompt(cfg.pairwise)
    return cfg


def load_prompt(cfg: PairwiseConfig) -> str:
    """The prompt template; a missing file or placeholder is a one-line ConfigError."""
    path = cfg.prompt_path
    if not path.is_file():
        raise ConfigError(f"pairwise.prompt: file not found: {path}")
    text = path.read_text(encoding="utf-8")
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise ConfigError(f"pairwise.prompt: {path} lacks the placeholder(s) {', '.join(missing)}")
    return text
