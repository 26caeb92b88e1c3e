"""The Alpaca pipeline (Taori et al. 2023): one request, a numbered batch of full tasks.

Each round sends `requests_per_round` prompts, each showing `num_prompt_instructions` seed
tasks drawn at random, and lets the teacher continue the numbered list of instruction, input
and output until it starts task `tasks_per_request` (20: 16 new tasks, as stanford_alpaca).
Replies are processed in request order once the whole round is back, so the result does not
depend on which request finished first; the sampling RNG is seeded by (seed, round, request),
so a resumed run asks exactly the same questions and the journal answers them.

Not here: prompt text and parsing (prompts.py), filters and dedup (gate.py), sending a round
and the rules that stop a run early (rounds.py).
"""

from __future__ import annotations

import random
from typing import Any, Callable

from alpaca_jax.llm.client import Request, Response, Teacher
from data_gen.committee import row_provenance
from data_gen.config import GenerateConfig
from data_gen.filters import instance_drop_reason
from data_gen.gate import InstructionGate
from data_gen.prompts import Parsed, SeedTask, encode_alpaca_prompt, parse_alpaca_response
from data_gen.report import Report
from data_gen.rounds import Answer, Rounds, RunStopped

__all__ = ["run_alpaca"]


def alpaca_requests(config: GenerateConfig, seeds: list[SeedTask], round_index: int) -> list[Request]:
    pipeline = config.pipeline
    sampling = config.sampling.instructions.params()
    # The reply stops as the teacher starts task `tasks_per_request` (stanford_alpaca stops at
    # 20: 16 new tasks after 3 demonstrations).
    n = pipeline.tasks_per_request
    requests = []
    for i in range(pipeline.requests_per_round):
        rng = random.Random(f"{pipeline.seed}/alpaca/{round_index}/{i}")
        demos = rng.sample(seeds, min(pipeline.num_prompt_instructions, len(seeds)))
        requests.append(Request.build(f"alpaca/{round_index}/{i}", encode_alpaca_prompt(demos, n),
                                      sampling, [f"\n{n}", f"{n}."]))
    return requests


def run_alpaca(config: GenerateConfig, seeds: list[SeedTask], teacher: Teacher, report: Report,
               bar: Callable[[str, int], Any]) -> list[dict[str, str]]:
    pipeline, filters = config.pipeline, config.filters
    gate = InstructionGate(filters, config.dedup, report, (s.instruction for s in seeds))
    rounds = Rounds(teacher, report, pipeline.max_idle_rounds)
    examples: list[dict[str, str]] = []
    num_demos = min(pipeline.num_prompt_instructions, len(seeds))

    def parse(request: Request, response: Response) -> Parsed:
        parsed = parse_alpaca_response(response.text, num_demos, response.finish_reason,
                                       filters.drop_truncated)
        report.unparseable_pieces += parsed.unparseable
        report.drop("truncated", parsed.truncated)
        return parsed

    progress = bar("instructions", pipeline.num_instructions)

    def accept(answer: Answer) -> int:
        kept = 0
        for instruction, task_input, task_output in answer.parsed.items if answer.parsed else ():
            if len(examples) >= pipeline.num_instructions:
                break
            reason = instance_drop_reason(task_input, task_output, filters)
            if reason is not None:
                report.candidates += 1
                report.drop(reason)
            elif gate.admit(instruction):
                examples.append({"instruction": instruction, "input": task_input, "output": task_output,
                                 **row_provenance(teacher, {"instructions": answer.request.key})})
                progress.update(1)
                kept += 1
        return kept

    report.finish("max_rounds", f"max_rounds ({pipeline.max_rounds}) reached before the target")
    try:
        for round_index in range(pipeline.max_rounds):
            if len(examples) >= pipeline.num_instructions:
                break
            rounds.send("alpaca", alpaca_requests(config, seeds, round_index), parse,
                        usable=lambda parsed: bool(parsed.items), accept=accept)
    except RunStopped as stopped:
        report.finish(stopped.stop, stopped.reason)
    progress.close()
    if len(examples) >= pipeline.num_instructions:
        report.finish("target", "target reached")
    report.kept = len(examples)
    return examples
