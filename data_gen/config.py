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
           "GenerateConfig", "MemberConfig", "CommitteeConfig", "BatchConfig", "CurationConfig",
           "CurateConfig", "STAGES", "load_config", "load_curate_config", "DEFAULT_SEED_TASKS", "DEFAULT_INSTANCE_DEMOS"]

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
    name: Literal["alpaca", "self-instruct", "safety"] = "alpaca"
    unsafe_instructions: str | None = None  # safety: the user's file of unsafe instructions (JSONL, JSON array or .txt)
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
class MemberConfig(TeacherConfig):
    """One teacher of a committee: a `teacher` block plus its name, weight, prices and caps."""
    name: str = ""                        # how stages, the judge and provenance name this teacher
    weight: float = 1.0                   # share of requests under committee.assign=weighted (0: judge only)
    prompt_per_million: float = 0.0       # USD per million prompt tokens
    completion_per_million: float = 0.0   # USD per million completion tokens
    max_requests: int | None = None       # this teacher's own cap on paid requests; None = no cap
    max_tokens: int | None = None         # this teacher's own cap on prompt+completion tokens
    max_cost_usd: float | None = None     # this teacher's own cap on cost (USD)

    def __post_init__(self):
        super().__post_init__()
        _require(bool(self.name), "teachers[].name must be set")
        _require(self.weight >= 0, f"teachers.{self.name}.weight must be >= 0")
        _require(self.mode == "online", f"teachers.{self.name}.mode: a committee teacher is online only")
        for cap in ("max_requests", "max_tokens", "max_cost_usd"):
            value = getattr(self, cap)
            _require(value is None or value > 0, f"teachers.{self.name}.{cap} must be > 0 or null")

    def budget_config(self) -> "BudgetConfig":
        price = ModelPrice(self.prompt_per_million, self.completion_per_million)
        return BudgetConfig(max_tokens=self.max_tokens, max_cost_usd=self.max_cost_usd,
                            max_requests=self.max_requests, prices={self.model: price})


STAGES = ("instructions", "classification", "instances", "curation")


@dataclass(frozen=True)
class CommitteeConfig:
    """How the `teachers` list shares the work (used only when `teachers` is not empty)."""
    assign: Literal["weighted", "per_stage"] = "weighted"   # each request to one teacher by weight, or by stage
    stages: dict[str, str] = field(default_factory=dict)    # per_stage: stage -> teacher name (others: weighted)
    answer: Literal["single", "best_of"] = "single"          # best_of: k teachers answer, the judge picks one
    k: int = 2                                               # best_of: teachers answering each request
    best_of_stages: tuple[str, ...] = ("instances",)         # best_of: the stages judged (others: single)
    judge: str | None = None                                 # best_of: the teacher (by name) that judges
    seed: int = 0                                            # seed of the assignment plan and of tie-breaks
    drop_after_failures: int = 3                             # drop a teacher after this many failed requests in one batch

    def __post_init__(self):
        _require(self.k >= 2, "committee.k must be >= 2")
        _require(self.drop_after_failures >= 1, "committee.drop_after_failures must be >= 1")
        for stage in (*self.stages, *self.best_of_stages):
            _require(stage in STAGES, f"committee: unknown stage {stage!r} (one of {list(STAGES)})")


@dataclass(frozen=True)
class BatchConfig:
    """teacher.mode=batch: the OpenAI Batch API (half the price, results within the window)."""
    completion_window: str = "24h"        # the Batch API's completion_window
    poll_interval_s: float = 30.0         # seconds between status polls
    max_wait_s: float | None = None       # give up polling after this long (the batch id stays journaled); None = wait
    retry: Literal["online", "next_batch"] = "online"   # expired/failed rows: retried online, or in the next batch
    max_attempts: int = 3                 # batches a row may be sent in before it counts as failed

    def __post_init__(self):
        _require(self.poll_interval_s > 0, "batch.poll_interval_s must be > 0")
        _require(self.max_attempts >= 1, "batch.max_attempts must be >= 1")
        _require(self.max_wait_s is None or self.max_wait_s > 0, "batch.max_wait_s must be > 0 or null")


@dataclass(frozen=True)
class CurationConfig:
    """Judge-scored curation (curate.py): keep rows the judge scores >= min_score."""
    enabled: bool = False                 # as a stage of generate: curate data.json into curated.json
    min_score: float = 4.5                # keep rows scored at least this (scale 1-5)
    judge: str | None = None              # committee teacher (by name) that scores; null = the teacher
    max_tokens: int = 256                 # completion tokens per rating (a short explanation, the score line)

    def __post_init__(self):
        _require(1.0 <= self.min_score <= 5.0, "curation.min_score must be in [1, 5]")
        _require(self.max_tokens >= 1, "curation.max_tokens must be >= 1")

    def sampling(self) -> "RequestSampling":
        """Greedy: the same row gets the same score on every run."""
        return RequestSampling(temperature=0.0, top_p=1.0, max_tokens=self.max_tokens)


@dataclass(frozen=True)
class CurateConfig:
    """`curate --judge CONFIG`: the judge that scores rows, its sampling and its budget."""
    judge: TeacherConfig = field(default_factory=lambda: TeacherConfig(model="gpt-4o-mini", api="chat"))
    sampling: RequestSampling = field(default_factory=lambda: RequestSampling(temperature=0.0, max_tokens=256))
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def __post_init__(self):
        self.sampling.check("judge")
        _require(self.judge.mode == "online", "judge.mode: curation sends its ratings online")
        if self.budget.max_cost_usd is not None:
            _require(self.judge.model in self.budget.prices,
                     f"budget.max_cost_usd needs budget.prices.{self.judge.model}")


@dataclass(frozen=True)
class GenerateConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    sampling: StageSampling = field(default_factory=StageSampling)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    teachers: tuple[MemberConfig, ...] = ()   # a committee of teachers; empty = the single `teacher`
    committee: CommitteeConfig = field(default_factory=CommitteeConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)
    complier: TeacherConfig | None = None  # safety: a second endpoint whose complying answers become the rejected side of pairs.json

    def __post_init__(self):
        if self.pipeline.name == "safety":
            _require(self.pipeline.unsafe_instructions is not None,
                     "pipeline.unsafe_instructions: the safety pipeline needs a file of unsafe instructions")
        if self.teachers:
            self._check_committee()
        elif self.budget.max_cost_usd is not None:
            _require(self.teacher.model in self.budget.prices,
                     f"budget.max_cost_usd needs budget.prices.{self.teacher.model}")

    def _check_committee(self) -> None:
        names = [m.name for m in self.teachers]
        _require(len(set(names)) == len(names), f"teachers: names must be unique, got {names}")
        _require(sum(m.weight for m in self.teachers) > 0, "teachers: at least one weight must be > 0")
        _require(self.teacher.mode == "online", "teacher.mode=batch works with one teacher, not `teachers`")
        committee = self.committee
        for stage, name in committee.stages.items():
            _require(name in names, f"committee.stages.{stage}: no teacher named {name!r} in {names}")
        if committee.answer == "best_of":
            _require(committee.judge in names, f"committee.judge: no teacher named {committee.judge!r} in {names}")
            answering = sum(m.weight > 0 for m in self.teachers)
            _require(answering >= committee.k,
                     f"committee.k={committee.k} needs as many teachers with weight > 0, got {answering}")
        if self.curation.judge is not None:
            _require(self.curation.judge in names, f"curation.judge: no teacher named {self.curation.judge!r}")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> GenerateConfig:
    """YAML file (optional) + overrides -> validated GenerateConfig; errors are ConfigError."""
    data = load_yaml(path) if path is not None else {}
    return build(GenerateConfig, apply_overrides(data, list(overrides)))


def load_curate_config(path: str | Path, overrides: list[str] = ()) -> CurateConfig:
    """The `curate --judge` YAML + overrides -> validated CurateConfig; errors are ConfigError."""
    return build(CurateConfig, apply_overrides(load_yaml(path), list(overrides)))
