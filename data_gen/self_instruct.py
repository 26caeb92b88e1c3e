"""The Self-Instruct pipeline (Wang et al. 2022): four stages through the teacher.

1. Bootstrap: prompts mix `num_prompt_instructions - num_machine_instructions` human seed
   instructions with `num_machine_instructions` already generated ones; the teacher continues
   the numbered list; candidates pass filters and ROUGE-L dedup against the whole pool.
2. Classification: is each new instruction a classification task (finite label set)?
3. Instances: output-first (class label, then input) for classification tasks, input-first
   for the rest, up to `max_instances_per_task` each.
4. Filter instances (empty, echoing, cut-off, conflicting) and write Alpaca-format examples.

Every request's content is a deterministic function of (seed, stage, position, pool so far),
and replies are consumed in request order after each batch, so a resumed run sends the same
requests, and the journal answers those already paid for.

Not here: prompt text and parsing (prompts.py), filters and dedup (gate.py, filters.py).
"""

from __future__ import annotations

import random
from typing import Any, Callable

from data_gen.config import GenerateConfig
from data_gen.filters import conflicting_instances, instance_drop_reason
from data_gen.gate import InstructionGate
from data_gen.prompts import (SeedTask, encode_bootstrap_prompt, encode_classification_prompt,
                              encode_instance_prompt, parse_bootstrap_response,
                              parse_classification_response, parse_instances)
from data_gen.report import Report
from data_gen.teacher import Request, Teacher

__all__ = ["run_self_instruct", "bootstrap_requests"]

_FEW_SHOT = 6  # demonstrations per label in the stage 2 and stage 3 prompts


def bootstrap_requests(config: GenerateConfig, seeds: list[SeedTask], machine: list[str],
                       round_index: int) -> list[Request]:
    pipeline = config.pipeline
    human = [s.instruction for s in seeds if s.is_classification or not pipeline.classification_only_seeds]
    requests = []
    for i in range(pipeline.requests_per_round):
        rng = random.Random(f"{pipeline.seed}/self-instruct/{round_index}/{i}")
        chosen = rng.sample(machine, min(pipeline.num_machine_instructions, len(machine)))
        chosen += rng.sample(human, min(pipeline.num_prompt_instructions - len(chosen), len(human)))
        rng.shuffle(chosen)
        prompt = encode_bootstrap_prompt(chosen, pipeline.classification_only_seeds)
        n = pipeline.tasks_per_request
        requests.append(Request(key=f"self-instruct/bootstrap/{round_index}/{i}", prompt=prompt,
                                params=(("stop", ["\n\n", f"\n{n}", f"{n}.", f"{n} ."]),)))
    return requests


def _few_shot(seeds: list[SeedTask], classification: bool | None, seed: int, label: str) -> list[SeedTask]:
    pool = [s for s in seeds if classification is None or s.is_classification == classification]
    return random.Random(f"{seed}/{label}").sample(pool, min(_FEW_SHOT, len(pool)))


def identify_classification(config: GenerateConfig, seeds: list[SeedTask], teacher: Teacher,
                            instructions: list[str], report: Report, tick) -> list[bool]:
    """Stage 2: one short, greedy request per instruction; unclear answers count as 'no'."""
    seed = config.pipeline.seed
    examples = _few_shot(seeds, True, seed, "clf-yes") + _few_shot(seeds, False, seed, "clf-no")
    random.Random(f"{seed}/clf-order").shuffle(examples)
    requests = [Request(key=f"self-instruct/classify/{i}",
                        prompt=encode_classification_prompt(examples, text),
                        params=(("temperature", 0.0), ("top_p", 1.0), ("max_tokens", 3),
                                ("stop", ["\n", "Task"])))
                for i, text in enumerate(instructions)]
    responses = teacher.complete(requests, on_done=tick)
    labels = []
    for request in requests:
        response = responses.get(request.key)
        answer = None if response is None or response.garbage else parse_classification_response(response.text)
        if answer is None and response is not None:
            report.extra["classification_unclear"] = report.extra.get("classification_unclear", 0) + 1
        labels.append(bool(answer))
    return labels


def generate_instances(config: GenerateConfig, seeds: list[SeedTask], teacher: Teacher,
                       instructions: list[str], labels: list[bool], report: Report,
                       tick) -> list[list[tuple[str, str]]]:
    """Stage 3 + the instance half of stage 4: valid (input, output) pairs per instruction."""
    pipeline, filters = config.pipeline, config.filters
    shots = {True: _few_shot(seeds, True, pipeline.seed, "inst-clf"),
             False: _few_shot(seeds, False, pipeline.seed, "inst-gen")}
    stop = [f"Example {pipeline.max_instances_per_task + 1}", "Task:"]
    requests = [Request(key=f"self-instruct/instances/{i}",
                        prompt=encode_instance_prompt(shots[label], text, label),
                        params=(("temperature", 0.0), ("top_p", 1.0), ("max_tokens", 350),
                                ("stop", stop)))
                for i, (text, label) in enumerate(zip(instructions, labels))]
    responses = teacher.complete(requests, on_done=tick)
    result = []
    for request, label in zip(requests, labels):
        response = responses.get(request.key)
        if response is None:
            result.append([])
            continue
        if response.garbage:
            report.drop("unparseable_response")
            result.append([])
            continue
        parsed = parse_instances(response.text, label, response.finish_reason, filters.drop_truncated)
        report.unparseable_pieces += parsed.unparseable
        report.drop("truncated", parsed.truncated)
        kept: list[tuple[str, str]] = []
        for task_input, task_output in parsed.items:
            reason = instance_drop_reason(task_input, task_output, filters)
            if reason is not None:
                report.drop(f"instance_{reason}")
            elif (task_input, task_output) in kept:
                report.drop("instance_duplicate")
            else:
                kept.append((task_input, task_output))
        if conflicting_instances(kept):
            report.drop("instance_conflicting", len(kept))
            kept = []
        result.append(kept[: pipeline.max_instances_per_task])
    return result


def run_self_instruct(config: GenerateConfig, seeds: list[SeedTask], teacher: Teacher,
                      report: Report, bar: Callable[[str, int], Any]) -> list[dict[str, str]]:
    pipeline = config.pipeline
    gate = InstructionGate(config.filters, config.dedup, report, (s.instruction for s in seeds))
    machine: list[str] = []
    stop_reason = f"max_rounds ({pipeline.max_rounds}) reached"
    progress = bar("stage 1: instructions", pipeline.num_instructions)
    for round_index in range(pipeline.max_rounds):
        if len(machine) >= pipeline.num_instructions:
            break
        budget_stop = teacher.budget.exhausted()
        if budget_stop:
            stop_reason = budget_stop
            break
        requests = bootstrap_requests(config, seeds, machine, round_index)
        responses = teacher.complete(requests)
        for request in requests:
            response = responses.get(request.key)
            if response is None:
                continue
            if response.garbage:
                report.drop("unparseable_response")
                continue
            parsed = parse_bootstrap_response(response.text, response.finish_reason,
                                              config.filters.drop_truncated)
            report.unparseable_pieces += parsed.unparseable
            report.drop("truncated", parsed.truncated)
            for instruction in parsed.items:
                if len(machine) >= pipeline.num_instructions:
                    break
                if gate.admit(instruction):
                    machine.append(instruction)
                    progress.update(1)
    progress.close()
    if len(machine) >= pipeline.num_instructions:
        stop_reason = "target reached"

    progress = bar("stage 2: classify", len(machine))
    labels = identify_classification(config, seeds, teacher, machine, report, lambda: progress.update(1))
    progress.close()
    progress = bar("stage 3: instances", len(machine))
    instances = generate_instances(config, seeds, teacher, machine, labels, report,
                                   lambda: progress.update(1))
    progress.close()

    examples = []
    for instruction, pairs in zip(machine, instances):
        if not pairs:
            report.drop("task_without_valid_instance")
        for task_input, task_output in pairs:
            examples.append({"instruction": instruction, "input": task_input, "output": task_output})
    budget_stop = teacher.budget.exhausted()
    report.stop_reason = budget_stop if budget_stop and stop_reason == "target reached" else stop_reason
    report.kept = len(examples)
    report.extra["instructions"] = len(machine)
    report.extra["classification_tasks"] = sum(labels)
    return examples
