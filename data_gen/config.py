"""The generator's configuration: one frozen dataclass per concern, built from YAML.

`load_config(path, overrides)` reads a YAML file, applies `section.field=value` overrides and
validates everything through `alpaca_jax.configlib` (the generic config library; no model code).
The example files live in `alpaca_jax/configs/generate/`; every key is documented there.

Not here: what the values do (alpaca_jax/llm/client.py, filters.py, the pipelines).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alpaca_jax.configlib import ConfigError, apply_overrides, build, load_yaml
from alpaca_jax.llm.config import BudgetConfig, ModelPrice, RequestSampling, TeacherConfig

__all__ = ["TeacherConfig", "RequestSampling", "InstanceSampling", "StageSampling", "PipelineConfig",
           "FilterConfig", "DedupConfig", "ModelPrice", "BudgetConfig", "OutputConfig",
           "GenerateConfig", "load_config", "DEFAULT_SEED_TASKS", "DEFAULT_INSTANCE_DEMOS"]

DEFAULT_SEED_TASKS = Path(__file__).resolve().parent / "seed_tasks.jsonl"
DEFAULT_INSTANCE_DEMOS = Path(__file__).resolve().parent / "instance_demos.jsonl"

# Words that mark a task a text-only model cannot do (Self-Instruct's list plus Alpaca's
# additions); matched as whole words, case-insensitively.
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map",
             "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# Each stage of a pipeline samples with its own block, so a penalty chosen for diverse
# instructions (stage 1) never leaks into the greedy classification and instance requests.
# Defaults are Self-Instruct's released settings; the original's top_p=0 beside temperature 0 is
# written as 1.0 here: greedy either way, and vLLM rejects top_p=0.
@dataclass(frozen=True)
class InstanceSampling(RequestSampling):
    temperature: float = 0.0
    max_tokens: int = 350
    presence_penalty: float = 1.5
    classification_max_tokens: int = 300

    def check(self, name: str) -> None:
        super().check(name)
        _require(self.classification_max_tokens >= 1,
                 f"sampling.{name}.classification_max_tokens must be >= 1")


@dataclass(frozen=True)
class StageSampling:
    instructions: RequestSampling = field(default_factory=RequestSampling)
    classification: RequestSampling = field(
        default_factory=lambda: RequestSampling(temperature=0.0, max_tokens=3))
    instances: InstanceSampling = field(default_factory=InstanceSampling)

    def __post_init__(self):
        for name in ("instructions", "classification", "instances"):
            getattr(self, name).check(name)


@dataclass(frozen=True)
class PipelineConfig:
    name: Literal["alpaca", "self-instruct"] = "alpaca"
    seed_tasks: str | None = None
    num_instructions: int = 100
    num_prompt_instructions: int = 3
    num_machine_instructions: int = 2
    requests_per_round: int = 5
    tasks_per_request: int = 20
    max_rounds: int = 1000
    max_idle_rounds: int = 3              # stop after this many batches in a row without a usable answer
    max_instances_per_task: int = 5
    instance_demos: str | None = None     # stage 3 demonstrations (JSONL); None = instance_demos.jsonl
    classification_only_seeds: bool = False
    seed: int = 0

    def __post_init__(self):
        _require(self.num_instructions >= 1, "pipeline.num_instructions must be >= 1")
        _require(self.num_prompt_instructions >= 1, "pipeline.num_prompt_instructions must be >= 1")
        _require(0 <= self.num_machine_instructions <= self.num_prompt_instructions,
                 "pipeline.num_machine_instructions must be in [0, num_prompt_instructions]")
        _require(self.requests_per_round >= 1, "pipeline.requests_per_round must be >= 1")
        # The reply stops as the teacher starts task `tasks_per_request`, so the new tasks are
        # numbered num_prompt_instructions + 1 .. tasks_per_request - 1.
        _require(self.tasks_per_request > self.num_prompt_instructions + 1,
                 "pipeline.tasks_per_request must exceed pipeline.num_prompt_instructions + 1")
        _require(self.max_rounds >= 1, "pipeline.max_rounds must be >= 1")
        _require(self.max_idle_rounds >= 1, "pipeline.max_idle_rounds must be >= 1")
        _require(self.max_instances_per_task >= 1, "pipeline.max_instances_per_task must be >= 1")

    @property
    def seed_path(self) -> Path:
        return Path(self.seed_tasks) if self.seed_tasks else DEFAULT_SEED_TASKS

    @property
    def instance_demos_path(self) -> Path:
        return Path(self.instance_demos) if self.instance_demos else DEFAULT_INSTANCE_DEMOS


@dataclass(frozen=True)
class FilterConfig:
    min_words: int = 4
    max_words: int = 150
    blacklist: tuple[str, ...] = BLACKLIST
    banned_prefixes: tuple[str, ...] = ("Write a program",)
    drop_punctuation_start: bool = True
    drop_non_ascii_start: bool = True
    drop_truncated: bool = True
    drop_empty_output: bool = True
    drop_input_equals_output: bool = True

    def __post_init__(self):
        _require(0 <= self.min_words <= self.max_words, "filters.min_words must be in [0, max_words]")


@dataclass(frozen=True)
class DedupConfig:
    enabled: bool = True
    threshold: float = 0.7
    tokenizer: Literal["rouge", "unicode"] = "rouge"
    similarity_histogram: bool = True

    def __post_init__(self):
        _require(0.0 <= self.threshold <= 1.0, "dedup.threshold must be in [0, 1]")


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/generate"
    progress: bool = True


@dataclass(frozen=True)
class GenerateConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    sampling: StageSampling = field(default_factory=StageSampling)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self):
        if self.budget.max_cost_usd is not None:
            _require(self.teacher.model in self.budget.prices,
                     f"budget.max_cost_usd needs budget.prices.{self.teacher.model}")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> GenerateConfig:
    """YAML file (optional) + overrides -> validated GenerateConfig; errors are ConfigError."""
    data = load_yaml(path) if path is not None else {}
    return build(GenerateConfig, apply_overrides(data, list(overrides)))
