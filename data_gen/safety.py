"""The safety pipeline (Safe-Alpaca, Bianchi et al. 2024): refusals for unsafe instructions.

The user supplies the unsafe instructions (`pipeline.unsafe_instructions`: JSONL or a JSON array
of `{instruction, input?}` objects or plain strings, or a text file with one per line); the
repository ships none. For each, the teacher writes a refusal (REFUSAL_PROMPT), which becomes one
Alpaca row `{instruction, input, output}`: the few percent of safety rows the study added to
Alpaca's 52K. With a `complier` teacher section (another endpoint, e.g. an unaligned model or our
own `alpaca-jax serve`), each instruction also gets a complying answer (COMPLY_PROMPT) and the
run writes `pairs.json` of `{instruction, input, chosen: refusal, rejected: complying}` rows for
preference tuning (`alpaca-jax train` with a `preference:` section reads them as they are).

Instructions go in batches of `pipeline.requests_per_round`, each request named by its index
(`safety/refuse/<i>`, `safety/comply/<i>`), through the same journal, budget and stop rules as the
other pipelines (rounds.py): a killed run, rerun, replays what the journal holds and pays for
nothing twice. An instruction whose request fails after retries or comes back empty has no row
this run; a rerun asks again.

Not here: sending and retrying requests (teacher.py), the stop rules (rounds.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from alpaca_jax.configlib import ConfigError
from alpaca_jax.files import read_utf8
from data_gen.config import GenerateConfig
from data_gen.report import Report
from data_gen.rounds import Answer, Rounds, RunStopped
from alpaca_jax.llm.client import Request, Response, Teacher

__all__ = ["run_safety", "read_unsafe_instructions", "REFUSAL_PROMPT", "COMPLY_PROMPT"]

REFUSAL_PROMPT = (
    "You are a responsible assistant. The request below asks for something harmful, dangerous or "
    "unethical. Write the reply a safe assistant gives: a brief, polite refusal that says why it "
    "cannot help and, where it fits, points to a safe alternative. Write only the reply.\n\n"
    "Request: {request}\n\nReply:")
COMPLY_PROMPT = "Answer the request below directly and completely. Write only the answer.\n\nRequest: {request}\n\nAnswer:"


def read_unsafe_instructions(path: str | Path) -> list[dict[str, str]]:
    """[{instruction, input}] from JSONL / a JSON array (objects or strings) or one per line of text."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline.unsafe_instructions: file not found: {path}")
    text = read_utf8(path, ConfigError)
    if path.suffix == ".txt":
        values: list[Any] = [line.strip() for line in text.splitlines() if line.strip()]
        where = [f"{path}:{i + 1}" for i in range(len(values))]
    elif text.lstrip().startswith("["):
        values = json.loads(text)
        where = [f"{path}: item {i + 1}" for i in range(len(values))]
    else:
        lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
        try:
            values = [json.loads(line) for _, line in lines]
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: malformed JSON line ({e.msg}); one instruction per line, as JSON") from None
        where = [f"{path}:{n}" for n, _ in lines]
    rows = []
    for value, at in zip(values, where):
        if isinstance(value, str):
            value = {"instruction": value}
        if not isinstance(value, dict) or not isinstance(value.get("instruction"), str) or not value["instruction"].strip():
            raise ConfigError(f"{at}: each row needs a non-empty 'instruction' string")
        rows.append({"instruction": value["instruction"].strip(), "input": str(value.get("input") or "")})
    if not rows:
        raise ConfigError(f"{path}: no instructions")
    return rows


def _request_text(row: dict[str, str]) -> str:
    return row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")


def _requests(kind: str, template: str, rows: list[dict[str, str]], start: int, sampling: dict) -> list[Request]:
    return [Request.build(f"safety/{kind}/{start + k}", template.format(request=_request_text(row)), sampling, [])
            for k, row in enumerate(rows)]


def _answers(rounds: Rounds, kind: str, requests: list[Request]) -> dict[str, str]:
    """Texts of the requests answered with something, by key."""
    got: dict[str, str] = {}

    def parse(request: Request, response: Response) -> str:
        return response.text.strip()

    def accept(answer: Answer) -> int:
        if answer.parsed:
            got[answer.request.key] = answer.parsed
        return int(bool(answer.parsed))

    rounds.send(f"safety/{kind}", requests, parse, usable=bool, accept=accept)
    return got


def run_safety(config: GenerateConfig, teacher: Teacher, complier: Teacher | None, report: Report,
               bar: Callable[[str, int], Any]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(Alpaca rows with refusals, chosen/rejected pairs or [] without a complier)."""
    pipeline = config.pipeline
    instructions = read_unsafe_instructions(pipeline.unsafe_instructions)
    sampling = config.sampling.instructions.params()
    refusing = Rounds(teacher, report, pipeline.max_idle_rounds)
    complying = Rounds(complier, report, pipeline.max_idle_rounds) if complier is not None else None
    rows, pairs = [], []
    progress = bar("instructions", len(instructions))
    report.finish("target", "every instruction answered")
    try:
        for start in range(0, len(instructions), pipeline.requests_per_round):
            batch = instructions[start:start + pipeline.requests_per_round]
            refusals = _answers(refusing, "refuse", _requests("refuse", REFUSAL_PROMPT, batch, start, sampling))
            answers = (_answers(complying, "comply", _requests("comply", COMPLY_PROMPT, batch, start, sampling))
                       if complying is not None else {})
            for k, row in enumerate(batch):
                refusal = refusals.get(f"safety/refuse/{start + k}")
                if refusal is None:
                    continue
                rows.append({**row, "output": refusal})
                progress.update(1)
                answer = answers.get(f"safety/comply/{start + k}")
                if answer is not None and answer != refusal:
                    pairs.append({**row, "chosen": refusal, "rejected": answer})
    except RunStopped as stopped:
        report.finish(stopped.stop, stopped.reason)
    progress.close()
    if len(rows) < len(instructions) and report.stop == "target":
        report.finish("no_progress", f"{len(instructions) - len(rows)} instructions got no refusal; rerun to ask again")
    report.kept = len(rows)
    return rows, pairs
