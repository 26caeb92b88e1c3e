"""The Alpaca pipeline (Taori et al. 2023): one request, a numbered batch of ~20 full tasks.

Each round sends `requests_per_round` prompts, each showing `num_prompt_instructions` seed
tasks drawn at random, and asks for `tasks_per_request` tasks with instruction, input and
output. Replies are processed in request order once the whole round is back, so the result
does not depend on which request finished first; the sampling RNG is seeded by (seed, round,
request), so a resumed run asks exactly the same questions and the journal answers them.

Not here: prompt text and parsing (prompts.py), filters and dedup (gate.py).
"""

from __future__ import annotations

import random
from typing import Any, Callable

from data_gen.config import GenerateConfig
from data_gen.filters import instance_drop_reason
from data_gen.gate import InstructionGate
from data_gen.prompts import SeedTask, encode_alpaca_prompt, parse_alpaca_response
from data_gen.report import Report
from data_gen.teacher import Request, Teacher

__all__ = ["run_alpaca"]


def alpaca_requests(config: GenerateConfig, seeds: list[SeedTask], round_index: int) -> list[Request]:
    pipeline = config.pipeline
    requests = []
    for i in range(pipeline.requests_per_round):
        rng = random.Random(f"{pipeline.seed}/alpaca/{round_index}/{i}")
        demos = rng.sample(seeds, min(pipeline.num_prompt_instructions, len(seeds)))
        prompt = encode_alpaca_prompt(demos, pipeline.tasks_per_request)
        # Stop before the model starts the task after the last one we asked for.
        stop = (f"\n{pipeline.tasks_per_request + 1}", f"{pipeline.tasks_per_request + 1}.")
        requests.append(Request(key=f"alpaca/{round_index}/{i}", prompt=prompt,
                                params=(("stop", list(stop)),)))
    return requests


def run_alpaca(config: GenerateConfig, seeds: list[SeedTask], teacher: Teacher, report: Report,
               bar: Callable[[str, int], Any]) -> list[dict[str, str]]:
    pipeline, filters = config.pipeline, config.filters
    gate = InstructionGate(filters, config.dedup, report, (s.instruction for s in seeds))
    examples: list[dict[str, str]] = []
    num_demos = min(pipeline.num_prompt_instructions, len(seeds))
    progress = bar("instructions", pipeline.num_instructions)
    stop_reason = f"max_rounds ({pipeline.max_rounds}) reached"
    for round_index in range(pipeline.max_rounds):
        if len(examples) >= pipeline.num_instructions:
            break
        budget_stop = teacher.budget.exhausted()
        if budget_stop:
            stop_reason = budget_stop
            break
        requests = alpaca_requests(config, seeds, round_index)
        responses = teacher.complete(requests)
        for request in requests:
            response = responses.get(request.key)
            if response is None:
                continue
            if response.garbage:
                report.drop("unparseable_response")
                continue
            parsed = parse_alpaca_response(response.text, num_demos, response.finish_reason,
                                           filters.drop_truncated)
            report.unparseable_pieces += parsed.unparseable
            report.drop("truncated", parsed.truncated)
            for instruction, task_input, task_output in parsed.items:
                if len(examples) >= pipeline.num_instructions:
                    break
                reason = instance_drop_reason(task_input, task_output, filters)
                if reason is not None:
                    report.candidates += 1
                    report.drop(reason)
                    continue
                if gate.admit(instruction):
                    examples.append({"instruction": instruction, "input": task_input,
                                     "output": task_output})
                    progress.update(1)
    progress.close()
    report.stop_reason = "target reached" if len(examples) >= pipeline.num_instructions else stop_reason
    report.kept = len(examples)
    return examples
