"""The Self-Instruct pipeline (Wang et al. 2022): four stages through the teacher.

1. Bootstrap: prompts mix `num_prompt_instructions - num_machine_instructions` human seed
   instructions with `num_machine_instructions` already generated ones; the teacher continues
   the numbered list; candidates pass filters and ROUGE-L dedup against the whole pool.
2. Classification: is each new instruction a classification task (finite label set)?
3. Instances: output-first (class label, then input) for classification tasks, input-first
   for the rest, up to `max_instances_per_task` each.
4. Filter instances (empty, echoing, cut-off, conflicting) and write Alpaca-format examples.

Each round takes its new instructions through all four stages before the next round starts,
so a run stopped early (budget, dead teacher) writes every task whose stages are complete.
Each stage samples with its own `sampling.*` block (Self-Instruct's settings by default).

Every request's content is a deterministic function of (seed, stage, position, pool so far),
and replies are consumed in request order after each batch, so a resumed run sends the same
requests, and the journal answers those already paid for.

Not here: prompt text and parsing (prompts.py), filters and dedup (gate.py, filters.py),
sending a batch and the rules that stop a run early (rounds.py).
"""

from __future__ import annotations

import random
from typing import Any, Callable

from alpaca_jax.llm.client import Request, Response, Teacher
from data_gen.committee import row_provenance
from data_gen.config import GenerateConfig
from data_gen.filters import conflicting_instances, instance_drop_reason
from data_gen.gate import InstructionGate
from data_gen.prompts import (DemoTask, Parsed, SeedTask, encode_bootstrap_prompt,
                              encode_classification_prompt, encode_instance_prompt,
                              parse_bootstrap_response, parse_classification_response,
                              parse_instances)
from data_gen.report import Report
from data_gen.rounds import Answer, Rounds, RunStopped
from data_gen.seeds import load_instance_demos

__all__ = ["run_self_instruct", "bootstrap_requests"]

_FEW_SHOT = 6  # demonstrations per label in the stage 2 prompt


def bootstrap_requests(config: GenerateConfig, seeds: list[SeedTask], machine: list[str],
                       round_index: int) -> list[Request]:
    pipeline = config.pipeline
    human = [s.instruction for s in seeds if s.is_classification or not pipeline.classification_only_seeds]
    sampling = config.sampling.instructions.params()
    n = pipeline.tasks_per_request
    requests = []
    for i in range(pipeline.requests_per_round):
        rng = random.Random(f"{pipeline.seed}/self-instruct/{round_index}/{i}")
        chosen = rng.sample(machine, min(pipeline.num_machine_instructions, len(machine)))
        chosen += rng.sample(human, min(pipeline.num_prompt_instructions - len(chosen), len(human)))
        rng.shuffle(chosen)
        prompt = encode_bootstrap_prompt(chosen, pipeline.classification_only_seeds)
        requests.append(Request.build(f"self-instruct/bootstrap/{round_index}/{i}", prompt, sampling,
                                      ["\n\n", f"\n{n}", f"{n}.", f"{n} ."]))
    return requests


def _few_shot(seeds: list[SeedTask], classification: bool, seed: int, label: str) -> list[SeedTask]:
    pool = [s for s in seeds if s.is_classification == classification]
    return random.Random(f"{seed}/{label}").sample(pool, min(_FEW_SHOT, len(pool)))


def classification_examples(seeds: list[SeedTask], seed: int) -> list[SeedTask]:
    examples = _few_shot(seeds, True, seed, "clf-yes") + _few_shot(seeds, False, seed, "clf-no")
    random.Random(f"{seed}/clf-order").shuffle(examples)
    return examples


def classification_requests(config: GenerateConfig, examples: list[SeedTask], machine: list[str],
                            first: int) -> list[Request]:
    """Stage 2: one short, greedy request per instruction, keyed by its place in the pool."""
    sampling = config.sampling.classification.params()
    return [Request.build(f"self-instruct/classify/{i}", encode_classification_prompt(examples, machine[i]),
                          sampling, ["\n", "Task"])
            for i in range(first, len(machine))]


def instance_requests(config: GenerateConfig, demos: list[DemoTask], machine: list[str],
                      labels: dict[int, bool]) -> list[Request]:
    """Stage 3 for the tasks whose stage 2 answer came back; classification prompts are
    longer, so their replies get fewer tokens (as in the original)."""
    block = config.sampling.instances
    stop = [f"Example {config.pipeline.max_instances_per_task + 1}", "Task:"]
    requests = []
    for i, label in labels.items():
        sampling = block.params()
        if label:
            sampling["max_tokens"] = block.classification_max_tokens
        requests.append(Request.build(f"self-instruct/instances/{i}",
                                      encode_instance_prompt(demos, machine[i], label), sampling, stop))
    return requests


def _valid_instances(parsed: Parsed, config: GenerateConfig, report: Report) -> list[tuple[str, str]]:
    """Stage 4 for one task: drop bad, duplicate and conflicting instances, keep the first few."""
    kept: list[tuple[str, str]] = []
    for task_input, task_output in parsed.items:
        reason = instance_drop_reason(task_input, task_output, config.filters)
        if reason is not None:
            report.drop(f"instance_{reason}")
        elif (task_input, task_output) in kept:
            report.drop("instance_duplicate")
        else:
            kept.append((task_input, task_output))
    if conflicting_instances(kept):
        report.drop("instance_conflicting", len(kept))
        kept = []
    return kept[: config.pipeline.max_instances_per_task]


def run_self_instruct(config: GenerateConfig, seeds: list[SeedTask], teacher: Teacher,
                      report: Report, bar: Callable[[str, int], Any]) -> list[dict[str, str]]:
    pipeline, filters = config.pipeline, config.filters
    gate = InstructionGate(filters, config.dedup, report, (s.instruction for s in seeds))
    rounds = Rounds(teacher, report, pipeline.max_idle_rounds)
    clf_examples = classification_examples(seeds, pipeline.seed)
    demos = load_instance_demos(pipeline.instance_demos_path)
    machine: list[str] = []
    origins: list[str] = []            # the stage 1 request each instruction came from
    labels: dict[int, bool] = {}       # stage 2 answers, by place in `machine`
    complete = 0                       # tasks that went through every stage
    examples: list[dict[str, str]] = []

    def parse_bootstrap(request: Request, response: Response) -> Parsed:
        parsed = parse_bootstrap_response(response.text, response.finish_reason, filters.drop_truncated)
        report.unparseable_pieces += parsed.unparseable
        report.drop("truncated", parsed.truncated)
        return parsed

    def parse_label(request: Request, response: Response) -> bool | None:
        answer = parse_classification_response(response.text)
        if answer is None:
            report.extra["classification_unclear"] = report.extra.get("classification_unclear", 0) + 1
        return answer

    def parse_instance_reply(request: Request, response: Response) -> Parsed:
        label = labels[_index(request)]
        parsed = parse_instances(response.text, label, response.finish_reason, filters.drop_truncated)
        report.unparseable_pieces += parsed.unparseable
        report.drop("truncated", parsed.truncated)
        return parsed

    def has_items(parsed: Parsed) -> bool:
        return bool(parsed.items)

    def accept_instructions(answer: Answer) -> int:
        kept = 0
        for instruction in answer.parsed.items if answer.parsed else ():
            if len(machine) >= pipeline.num_instructions:
                break
            if gate.admit(instruction):
                machine.append(instruction)
                origins.append(answer.request.key)
                kept += 1
        return kept

    def accept_label(answer: Answer) -> int:
        # Garbage and unclear answers count as "no", the original's rule.
        labels[_index(answer.request)] = bool(answer.parsed)
        return answer.parsed is not None

    def accept_instances(answer: Answer) -> int:
        nonlocal complete
        pairs = _valid_instances(answer.parsed, config, report) if answer.parsed else []
        if not pairs:
            report.drop("task_without_valid_instance")
        index = _index(answer.request)
        provenance = row_provenance(teacher, {"instructions": origins[index],
                                              "classification": f"self-instruct/classify/{index}",
                                              "instances": answer.request.key})
        examples.extend({"instruction": machine[index], "input": task_input, "output": task_output,
                         **provenance} for task_input, task_output in pairs)
        complete += 1
        progress.update(1)
        return len(pairs)

    progress = bar("tasks through all stages", pipeline.num_instructions)
    report.finish("max_rounds", f"max_rounds ({pipeline.max_rounds}) reached before the target")
    try:
        for round_index in range(pipeline.max_rounds):
            if len(machine) >= pipeline.num_instructions:
                break
            first = len(machine)
            rounds.send("stage 1 (instructions)", bootstrap_requests(config, seeds, machine, round_index),
                        parse_bootstrap, has_items, accept_instructions)
            if len(machine) == first:
                continue
            # A stage 2 or 3 request that failed after its retries leaves its task incomplete
            # (not written); a rerun asks again and finishes it.
            rounds.send("stage 2 (classification)",
                        classification_requests(config, clf_examples, machine, first),
                        parse_label, lambda answer: answer is not None, accept_label)
            new_labels = {i: labels[i] for i in range(first, len(machine)) if i in labels}
            if new_labels:
                    rounds.send("stage 3 (instances)", instance_requests(config, demos, machine, new_labels),
                            parse_instance_reply, has_items, accept_instances)
    except RunStopped as stopped:
        report.finish(stopped.stop, stopped.reason)
    progress.close()
    if len(machine) >= pipeline.num_instructions:
        if complete == len(machine):
            report.finish("target", "target reached")
        elif report.stop == "max_rounds":   # stage 2 or 3 requests failed after their retries
            report.finish("no_progress", f"{len(machine) - complete} tasks lack a stage 2 or 3 answer "
                          f"(requests failed after retries; last error: {teacher.last_error}); "
                          "rerun the same command to finish them")
    report.kept = len(examples)
    report.extra["instructions"] = len(machine)
    report.extra["classification_tasks"] = sum(labels.values())
    report.extra["incomplete_tasks"] = len(machine) - complete
    return examples


def _index(request: Request) -> int:
    """A stage 2 or 3 request's task: its place in the pool, the last part of its key."""
    return int(request.key.rsplit("/", 1)[1])
