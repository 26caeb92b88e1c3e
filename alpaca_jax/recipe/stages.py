"""The recipe's stages as a registry: each stage is one small adapter around its own command.

A `Stage` says which kinds of artifact it reads from the stages before it (`consumes`: the
latest `data` file, the latest `model`), what it writes under `RECIPE_DIR/<stage>/`
(`produces`), how to turn its section of the recipe into its command's own config (`build`,
the same YAML the command takes), which files named in that config it reads (`external`), and
how to run (`run`, which returns a summary for the report).

Stages resume on their own after a kill (the generator's journal, curation's rating journal,
training checkpoints, the judge journal), so the runner only has to call `run` again in the
same folder.

The heavy modules (JAX, the HF writer) are imported when a stage runs, not here: a recipe with
a bad key must fail in well under a second.

Not here: deciding what runs (runner.py), manifests (manifest.py), the report (report.py).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from alpaca_jax.configlib import ConfigError, apply_overrides, build, parse_bytes, to_dict
from alpaca_jax.errors import UserError

__all__ = ["Stage", "StageContext", "STAGES", "ORDER", "RecipeError"]


class RecipeError(UserError, RuntimeError):
    """A recipe that cannot run as written (unknown stage, missing input, a stage that
    stopped short); the message is one line naming the stage and the key."""


@dataclass(frozen=True)
class StageContext:
    name: str
    dir: Path                       # RECIPE_DIR/<stage>
    data: Path | None = None        # the latest data file an earlier stage wrote
    model: Path | None = None       # the latest trained model
    teacher_url: str | None = None  # a served teacher for `generate` (the closed loop)


@dataclass(frozen=True)
class Stage:
    name: str
    consumes: tuple[str, ...] = ()
    produces: dict[str, str] = field(default_factory=dict)   # kind -> path in the stage dir
    build: Callable[[dict, StageContext], Any] | None = None
    external: Callable[[Any], dict[str, Path]] = lambda cfg: {}
    run: Callable[[Any, StageContext], dict] | None = None
    keep_on_change: bool = False    # keep the stage dir when config or inputs change: paid work inside
    own_input: bool = False         # the first data stage may name its file itself (`input`)
    # Checks that import heavy modules: run before the first stage runs, and only for the
    # stages about to run, so a rerun that skips everything stays fast.
    check: Callable[[Any], None] = lambda cfg: None

    def resolved(self, cfg: Any) -> Any:
        """The config as plain data, for the manifest and the fingerprint."""
        return to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg


# -- generate ------------------------------------------------------------------------------

TEACHER_MODEL_NAME = "recipe-teacher"
TEACHER_KEY_ENV = "ALPACA_JAX_RECIPE_TEACHER_KEY"


def _build_generate(section: dict, ctx: StageContext):
    from data_gen.config import GenerateConfig
    return build(GenerateConfig, apply_overrides(section, [f"output.dir={ctx.dir}"]))


def _run_generate(cfg, ctx: StageContext) -> dict:
    from data_gen.generate import generate
    from alpaca_jax.llm.client import TeacherFatalError
    if ctx.teacher_url is not None:  # the closed loop: an earlier round's model, served by us
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(
            cfg.teacher, base_url=ctx.teacher_url, model=TEACHER_MODEL_NAME, api_key_env=TEACHER_KEY_ENV))
    try:
        report = generate(cfg)
    except TeacherFatalError as e:
        raise RecipeError(f"stage 'generate': {e}") from None
    if report["stop"] != "target":
        raise RecipeError(f"stage 'generate' stopped before pipeline.num_instructions: {report['stop_reason']}")
    return {"kept": report["kept"], "candidates": report["candidates"], "dropped": report["dropped"],
            "cost_usd": report["tokens"]["cost_usd"], "tokens": report["tokens"]["total"]}


# -- dedup -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DedupStageConfig:
    """`alpaca-jax dedup`'s options: drop an instruction whose ROUGE-L F against an earlier kept one exceeds threshold."""
    threshold: float = 0.7                 # drop when ROUGE-L F > this
    tokenizer: Literal["rouge", "unicode"] = "rouge"  # rouge: rouge-score's ASCII tokens; unicode: any script
    field: str = "instruction"             # the record field compared
    input: str | None = None               # the data file when no earlier stage writes one

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"dedup.threshold must be in [0, 1], got {self.threshold}")


def _data_input(stage: str, own: str | None, ctx: StageContext) -> Path:
    if ctx.data is not None:
        return ctx.data
    if own is None:
        raise ConfigError(f"config key '{stage}.input': no earlier stage writes data; name a file")
    return Path(own)


def _build_dedup(section: dict, ctx: StageContext) -> DedupStageConfig:
    cfg = build(DedupStageConfig, section, "dedup")
    _data_input("dedup", cfg.input, ctx)
    return cfg


def _run_dedup(cfg: DedupStageConfig, ctx: StageContext) -> dict:
    from data_gen.dedup import dedup_file
    try:
        result = dedup_file(_data_input("dedup", cfg.input, ctx), ctx.dir / "data.json",
                            cfg.threshold, cfg.tokenizer, cfg.field)
    except ValueError as e:  # JSON errors and records without the field
        raise RecipeError(f"stage 'dedup': {' '.join(str(e).split())}") from None
    return {"kept": len(result.kept), "dropped": len(result.dropped)}


# -- curate ----------------------------------------------------------------------------------

@functools.cache
def _curate_config_class():
    """`python -m data_gen curate`'s judge YAML (judge, sampling, budget) plus its two options,
    flat: the section reads like the judge config, and a changed key is named `curate.<key>`.
    Made on first use: importing data_gen (the OpenAI client) takes most of a second."""
    from data_gen.config import CurateConfig

    @dataclass(frozen=True)
    class CurateStageConfig(CurateConfig):
        min_score: float = 4.5             # keep rows the judge scores >= this (1-5), `--min-score`
        input: str | None = None           # the data file when no earlier stage writes one

        def __post_init__(self):
            super().__post_init__()
            if not 1.0 <= self.min_score <= 5.0:
                raise ConfigError(f"curate.min_score must be in [1, 5], got {self.min_score}")

    return CurateStageConfig


def _build_curate(section: dict, ctx: StageContext):
    cfg = build(_curate_config_class(), section, "curate")
    _data_input("curate", cfg.input, ctx)
    return cfg


def _run_curate(cfg, ctx: StageContext) -> dict:
    from data_gen.curate import curate_file
    from alpaca_jax.llm.client import TeacherFatalError
    try:
        # The rating journal (data.journal.jsonl) stays in the stage dir: a rerun pays for no rating twice.
        report = curate_file(_data_input("curate", cfg.input, ctx), ctx.dir / "data.json", cfg, cfg.min_score)
    except ValueError as e:  # JSON errors and rows without instruction/output
        raise RecipeError(f"stage 'curate': {' '.join(str(e).split())}") from None
    except TeacherFatalError as e:
        raise RecipeError(f"stage 'curate': {e}") from None
    if report["not_sent"]:
        raise RecipeError(f"stage 'curate' stopped: {report['budget_stop']}; {report['not_sent']} rows not "
                          "rated; raise curate.budget.* and rerun")
    if report["failed"]:
        raise RecipeError(f"stage 'curate': {report['failed']} ratings failed after their retries (last error: "
                          f"{report['this_run']['last_error']}); rerun to finish")
    return {"rows": report["rows"], "kept": report["kept"], "unparseable": report["unparseable"],
            "cost_usd": report["tokens"]["cost_usd"], "tokens": report["tokens"]["total"],
            "requests_sent": report["this_run"]["completed"]}


# -- train -----------------------------------------------------------------------------------

def _build_train(section: dict, ctx: StageContext):
    from alpaca_jax.config import config_from_dict
    overrides = [f"run.dir={ctx.dir / 'run'}"]
    if ctx.data is not None:
        overrides.append(f"data.train_files=[{ctx.data}]")
    return config_from_dict(section, overrides)


def _run_train(cfg, ctx: StageContext) -> dict:
    from alpaca_jax import preflight
    from alpaca_jax.train import train
    preflight.check_train_outputs(cfg)
    result = train(cfg)
    return {"steps": result.steps, "first_loss": result.first_loss, "last_loss": result.last_loss}


# -- preference ------------------------------------------------------------------------------

def _build_preference(section: dict, ctx: StageContext):
    """`alpaca-jax train`'s YAML with a `preference:` section; the starting weights (and, with
    preference.reference null, the frozen reference) are the model of the stage before."""
    from alpaca_jax.config import config_from_dict
    overrides = [f"run.dir={ctx.dir / 'run'}"]
    if ctx.model is not None:
        overrides.append(f"model.init_from={ctx.model}")
    cfg = config_from_dict(section, overrides)
    if cfg.preference is None:
        raise ConfigError("config key 'preference.preference': the stage's train YAML needs a `preference:` "
                          "section (DPO); without one it is supervised fine-tuning (the train stage)")
    if not cfg.data.train_files:
        raise ConfigError("config key 'preference.data.train_files': name the preference pairs file(s)")
    return cfg


def _preference_external(cfg) -> dict[str, Path]:
    files = {f"data.train_files[{i}]": Path(f) for i, f in enumerate(cfg.data.train_files)}
    files.update({f"data.eval_files[{i}]": Path(f) for i, f in enumerate(cfg.data.eval_files)})
    if cfg.preference.reference is not None:
        files["preference.reference"] = Path(cfg.preference.reference)
    return files


# -- eval ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalStageConfig:
    """`alpaca-jax eval`'s options; the trained model is the first run."""
    data: str = ""                          # eval instructions file (with or without reference outputs)
    judge: dict[str, Any] | None = None     # the judge YAML (configs/judge/default.yaml), nested; null = no judge
    baseline: str | None = None             # 'references' or one run; null = eval's default
    runs: tuple[str, ...] = ()              # more runs or model-outputs files to compare against
    max_new_tokens: int = 256               # generation length cap
    batch_size: int = 16                    # prompts decoded together
    limit: int | None = None                # only the first N instructions

    def __post_init__(self):
        if not self.data:
            raise ConfigError("config key 'eval.data': the eval instructions file is required")


def _judge_config(cfg: EvalStageConfig):
    from alpaca_jax.eval.config import JudgeConfig, load_prompt
    if cfg.judge is None:
        return None
    judge = build(JudgeConfig, cfg.judge, "eval.judge")
    load_prompt(judge.pairwise)
    return judge


def _build_eval(section: dict, ctx: StageContext) -> EvalStageConfig:
    cfg = build(EvalStageConfig, section, "eval")
    if not Path(cfg.data).is_file():
        raise ConfigError(f"config key 'eval.data': file not found: {cfg.data}")
    return cfg


def _run_eval(cfg: EvalStageConfig, ctx: StageContext) -> dict:
    from alpaca_jax.eval import evaluate
    results = evaluate([str(ctx.model), *cfg.runs], cfg.data, ctx.dir, judge=_judge_config(cfg),
                       baseline=cfg.baseline, max_new_tokens=cfg.max_new_tokens,
                       batch_size=cfg.batch_size, limit=cfg.limit, progress=False)
    judge = results.get("judge") or {}
    return {"instructions": results["instructions"], "judge_cost_usd": judge.get("cost_usd", 0.0),
            "judge_requests_sent": judge.get("requests_sent", 0)}


# -- export ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportStageConfig:
    """`alpaca-jax export-hf`'s options, and export-gguf's type."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # written dtype; null = the run's model.param_dtype
    max_shard_size: str = "5GiB"           # largest safetensors file
    merge: bool = False                    # LoRA runs: fold the adapters into the weights
    # also write gguf/model-<type>.gguf for llama.cpp (`alpaca-jax export-gguf --type`); null: none
    gguf: Literal["f32", "f16", "bf16", "q8_0", "q4_0"] | None = None

    def __post_init__(self):
        parse_bytes(self.max_shard_size)


def _build_export(section: dict, ctx: StageContext) -> ExportStageConfig:
    return build(ExportStageConfig, section, "export")


def _run_export(cfg: ExportStageConfig, ctx: StageContext) -> dict:
    from alpaca_jax.hf import export_hf
    export_hf(ctx.model, ctx.dir / "hf", dtype=cfg.dtype, max_shard_size=parse_bytes(cfg.max_shard_size),
              merge=cfg.merge)
    # Always made, so the stage's outputs are the same two folders whether or not GGUF is asked for.
    (ctx.dir / "gguf").mkdir(exist_ok=True)
    if cfg.gguf is not None:
        from alpaca_jax.gguf_export import export_gguf  # LoRA runs are merged, as export-gguf does
        export_gguf(ctx.model, ctx.dir / "gguf" / f"model-{cfg.gguf}.gguf", type=cfg.gguf)
    return {}


# -- the registry, in recipe order ------------------------------------------------------------

def _generate_external(cfg) -> dict[str, Path]:
    return {"seed_tasks": cfg.pipeline.seed_path, "instance_demos": cfg.pipeline.instance_demos_path}


def _own_input(cfg) -> dict[str, Path]:
    return {"input": Path(cfg.input)} if cfg.input else {}


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("generate", produces={"data": "data.json", "report": "report.json"}, build=_build_generate,
          external=_generate_external, run=_run_generate, keep_on_change=True),
    Stage("dedup", consumes=("data",), produces={"data": "data.json"}, build=_build_dedup,
          external=_own_input, run=_run_dedup, own_input=True),
    Stage("curate", consumes=("data",), produces={"data": "data.json", "scores": "data.scores.jsonl"},
          build=_build_curate, external=_own_input, run=_run_curate, keep_on_change=True, own_input=True),
    Stage("train", consumes=("data",), produces={"model": "run"}, build=_build_train, run=_run_train),
    Stage("preference", consumes=("model",), produces={"model": "run"}, build=_build_preference,
          external=_preference_external, run=_run_train),
    Stage("eval", consumes=("model",), produces={"results": "results.json"}, build=_build_eval,
          external=lambda cfg: {"data": Path(cfg.data)}, run=_run_eval, keep_on_change=True,
          check=_judge_config),
    Stage("export", consumes=("model",), produces={"hf": "hf", "gguf": "gguf"}, build=_build_export,
          run=_run_export),
)}
ORDER = tuple(STAGES)
