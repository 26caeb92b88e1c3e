"""`alpaca-jax recipe RECIPE.yaml`: run a recipe's stages in order, each once per config and inputs.

A recipe is YAML: `dir` (RECIPE_DIR), optionally `stages` (which to run; default: every stage
section present), optionally `teacher_from` (a model the recipe serves as the generator's
teacher: the closed loop), and one section per stage holding that stage's own config. Before
a stage runs, its fingerprint (resolved config + input hashes) is compared with its manifest:

- done:    same fingerprint, status done, outputs unchanged -> skipped;
- stale:   config or an input changed, or an output is missing or changed -> run again (in a
           fresh folder, except stages with paid work inside, which resume in theirs);
- pending: never ran, or was killed (status running) -> run; a killed stage resumes inside.

Not here: what a stage does (stages.py), hashing (manifest.py), the report (report.py).
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alpaca_jax.configlib import ConfigError, apply_overrides, load_yaml
from alpaca_jax.recipe.manifest import fingerprint, hash_path, read_manifest, write_manifest
from alpaca_jax.recipe.report import write_report
from alpaca_jax.recipe.stages import ORDER, STAGES, RecipeError, Stage, StageContext
from alpaca_jax.recipe.teacher import served_teacher

__all__ = ["Recipe", "load_recipe", "run_recipe", "recipe_status", "StageState"]

_TOP_KEYS = ("dir", "stages", "teacher_from")


@dataclass(frozen=True)
class Recipe:
    dir: Path
    stages: tuple[str, ...]           # in recipe order
    sections: dict[str, dict]
    teacher_from: str | None = None


@dataclass(frozen=True)
class StageState:
    name: str
    state: str      # done | stale | pending
    why: str


def _unknown_stage(name: str, where: str) -> RecipeError:
    return RecipeError(f"{where}: unknown stage '{name}' (known: {', '.join(ORDER)})")


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """The recipe YAML with `key=value` overrides (`dedup.threshold=0.5`, `dir=runs/r2`)."""
    data = apply_overrides(load_yaml(path), list(overrides))
    for key in data:
        if key not in _TOP_KEYS and key not in STAGES:
            raise _unknown_stage(key, f"recipe {path}")
    listed = data.get("stages") or [name for name in ORDER if name in data]
    if not isinstance(listed, list) or not all(isinstance(s, str) for s in listed):
        raise ConfigError(f"config key 'stages': expected a list of stage names, got {listed!r}")
    for name in listed:
        if name not in STAGES:
            raise _unknown_stage(name, "config key 'stages'")
    sections = {}
    for name in listed:
        section = data.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"config key '{name}': expected a mapping (the stage's own config)")
        sections[name] = section
    directory = data.get("dir") or str(Path("runs") / "recipes" / Path(path).stem)
    teacher = data.get("teacher_from")
    if teacher is not None and not Path(str(teacher)).exists():
        raise ConfigError(f"config key 'teacher_from': model not found: {teacher}")
    if teacher is not None and "generate" not in listed:
        raise ConfigError("config key 'teacher_from': the recipe has no generate stage to teach")
    return Recipe(Path(str(directory)), tuple(n for n in ORDER if n in listed), sections,
                  None if teacher is None else str(teacher))


# -- planning ----------------------------------------------------------------------------------

@dataclass
class _Planned:
    stage: Stage
    ctx: StageContext
    config: Any
    inputs: dict[str, str | None]
    fingerprint: str


def _context(recipe: Recipe, name: str, latest: dict[str, tuple[str, Path]]) -> StageContext:
    return StageContext(name=name, dir=(recipe.dir / name).absolute(),
                        data=latest["data"][1] if "data" in latest else None,
                        model=latest["model"][1] if "model" in latest else None)


def _plan(recipe: Recipe, name: str, latest: dict[str, tuple[str, Path]]) -> _Planned:
    """Build the stage's config and hash its inputs (upstream: that stage's manifest)."""
    stage = STAGES[name]
    ctx = _context(recipe, name, latest)
    try:
        config = stage.build(recipe.sections[name], ctx)
    except ConfigError as e:
        raise ConfigError(f"stage '{name}': {e}") from None
    inputs: dict[str, str | None] = {}
    for kind in stage.consumes:
        if kind not in latest:
            if kind == "data" and stage.own_input:
                continue  # the stage's `input` names the file: hashed below as an external input
            raise RecipeError(f"stage '{name}': input '{kind}': no earlier stage in the recipe writes one")
        producer, path = latest[kind]
        manifest = read_manifest(recipe.dir / producer) or {}
        inputs[kind] = f"{producer}:{manifest.get('fingerprint')}:{manifest.get('outputs', {}).get(kind)}"
    for key, path in stage.external(config).items():
        inputs[key] = hash_path(path)
    if name == "generate" and recipe.teacher_from is not None:
        inputs["teacher_from"] = hash_path(recipe.teacher_from)
    return _Planned(stage, ctx, config, inputs, fingerprint(stage.resolved(config), inputs))


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = []
        for key in sorted(set(old) | set(new)):
            keys += _changed_keys(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return keys
    return [] if old == new else [prefix or "config"]


def _judge(planned: _Planned, reruns: set[str], producers: dict[str, str]) -> StageState:
    name = planned.stage.name
    manifest = read_manifest(planned.ctx.dir)
    if manifest is None:
        return StageState(name, "pending", "not run yet")
    upstream = sorted({producers[k] for k in planned.stage.consumes if producers.get(k) in reruns})
    if upstream:
        return StageState(name, "stale", f"an earlier stage runs again: {', '.join(upstream)}")
    if manifest.get("fingerprint") != planned.fingerprint:
        keys = _changed_keys(manifest.get("config"), planned.stage.resolved(planned.config))
        if keys:
            return StageState(name, "stale", "config changed: " + ", ".join(f"{name}.{k}" for k in keys[:5]))
        inputs = [k for k in planned.inputs if manifest.get("inputs", {}).get(k) != planned.inputs[k]]
        return StageState(name, "stale", "input changed: " + ", ".join(inputs or ["(unknown)"]))
    if manifest.get("status") != "done":
        return StageState(name, "pending", "interrupted: resumes where it stopped")
    for kind, rel in planned.stage.produces.items():
        if hash_path(planned.ctx.dir / rel) != manifest.get("outputs", {}).get(kind):
            return StageState(name, "stale", f"output '{kind}' ({rel}) missing or changed")
    return StageState(name, "done", "config and inputs unchanged, outputs complete")


def _bounds(recipe: Recipe, start: str | None, until: str | None) -> tuple[int, int]:
    for flag, name in (("--from", start), ("--until", until)):
        if name is not None and name not in recipe.stages:
            raise RecipeError(f"{flag} {name}: not a stage of this recipe ({', '.join(recipe.stages)})")
    first = recipe.stages.index(start) if start else 0
    last = recipe.stages.index(until) if until else len(recipe.stages) - 1
    if first > last:
        raise RecipeError(f"--from {start} comes after --until {until}")
    return first, last


def _walk(recipe: Recipe, start: str | None, until: str | None, execute: bool, log) -> list[tuple[StageState, _Planned]]:
    first, last = _bounds(recipe, start, until)
    latest: dict[str, tuple[str, Path]] = {}
    producers: dict[str, str] = {}
    reruns: set[str] = set()
    states = []
    for index, name in enumerate(recipe.stages):
        stage = STAGES[name]
        if index < first:  # before --from: not run; a later stage reads what it left
            for kind, rel in stage.produces.items():
                latest[kind], producers[kind] = (name, (recipe.dir / name / rel).absolute()), name
            continue
        if index == first:
            _check_from(recipe, name, latest)
        if index > last:
            break
        planned = _plan(recipe, name, latest)
        state = _judge(planned, reruns, producers)
        states.append((state, planned))
        if state.state != "done":
            reruns.add(name)
        if execute:
            log(f"{name}: {'skipped' if state.state == 'done' else 'running'} ({state.state}: {state.why})")
            if state.state != "done":
                started = time.monotonic()
                _run_stage(recipe, planned)
                log(f"{name}: done in {time.monotonic() - started:.1f} s")
        for kind, rel in stage.produces.items():
            latest[kind], producers[kind] = (name, (planned.ctx.dir / rel)), name
    return states


def _check_from(recipe: Recipe, start: str, latest: dict[str, tuple[str, Path]]) -> None:
    """Every input that the stages from `start` on read from earlier stages must be finished."""
    for name in recipe.stages[recipe.stages.index(start):]:
        for kind in STAGES[name].consumes:
            if kind not in latest:
                continue
            producer, path = latest[kind]
            manifest = read_manifest(recipe.dir / producer)
            if manifest is None or manifest.get("status") != "done" or not path.exists():
                raise RecipeError(f"--from {start}: stage '{name}' input '{kind}' is missing: stage "
                                  f"'{producer}' has not finished in {recipe.dir / producer}")


def _run_stage(recipe: Recipe, planned: _Planned) -> None:
    stage, ctx = planned.stage, planned.ctx
    old = read_manifest(ctx.dir)
    if old is not None and old.get("fingerprint") != planned.fingerprint and not stage.keep_on_change:
        shutil.rmtree(ctx.dir)  # a different run: start clean (a same-fingerprint one resumes)
    record = {"stage": stage.name, "status": "running", "fingerprint": planned.fingerprint,
              "config": stage.resolved(planned.config), "inputs": planned.inputs,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_manifest(ctx.dir, record)
    if stage.name == "generate" and recipe.teacher_from is not None:
        with served_teacher(recipe.teacher_from, ctx.dir / "teacher_serve.log") as url:
            summary = stage.run(planned.config, StageContext(ctx.name, ctx.dir, ctx.data, ctx.model, url))
    else:
        summary = stage.run(planned.config, ctx)
    record.update(status="done", summary=summary,
                  outputs={kind: hash_path(ctx.dir / rel) for kind, rel in stage.produces.items()},
                  finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_manifest(ctx.dir, record)


def recipe_status(recipe: Recipe, start: str | None = None, until: str | None = None) -> list[StageState]:
    """Each stage's state and why, without running anything."""
    return [state for state, _ in _walk(recipe, start, until, execute=False, log=None)]


def run_recipe(recipe: Recipe, start: str | None = None, until: str | None = None,
               log=lambda line: print(line, file=sys.stderr, flush=True)) -> list[StageState]:
    """Run the stages in [start, until] that are not done; write RECIPE_DIR/report.md."""
    to_run = [(s, p) for s, p in _walk(recipe, start, until, execute=False, log=None) if s.state != "done"]
    for state, planned in to_run:  # every config error before the first stage spends anything
        try:
            planned.stage.check(planned.config)
        except ConfigError as e:
            raise ConfigError(f"stage '{state.name}': {e}") from None
    recipe.dir.mkdir(parents=True, exist_ok=True)
    states = [state for state, _ in _walk(recipe, start, until, execute=True, log=log)]
    if to_run or not (recipe.dir / "report.md").is_file():
        write_report(recipe.dir, recipe.stages)
    log(f"report: {recipe.dir / 'report.md'}")
    return states


def format_status(states: list[StageState]) -> str:
    return "".join(f"{s.name:<10} {s.state:<8} {s.why}\n" for s in states)
