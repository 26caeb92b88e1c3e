"""`alpaca-jax respond`: answer every row of an instruction file, resumably.

Input: Alpaca rows (`{instruction, input[, output]}`, JSON array or JSONL) or Self-Instruct
tasks (`{instruction, instances: [{input, output}]}`, one row per instance), each prompted with
the run's chat template as training rendered such a row (data/prompt.py). Output: JSONL, one
line per answered row, keyed by the row's index, appended and flushed as each row finishes
decoding (rows decode in a continuous batch, so a long answer does not hold back the short ones
beside it). A rerun after a crash (even SIGKILL mid-write) drops a torn last line, skips the
rows already answered and answers the rest, so every row ends up answered exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from alpaca_jax.data.prompt import PromptTooLongError, alpaca_messages
from alpaca_jax.data.records import DataError, read_records, resolve_data_path
from alpaca_jax.infer import Row, SamplingConfig, load_model, stream_rows
from alpaca_jax.jsonl import read_jsonl

log = logging.getLogger("alpaca_jax")
FSYNC_EVERY_S = 1.0  # how often answers are forced to disk (a killed process loses nothing flushed)


def _answered(output: Path, rows: list[dict[str, str]]) -> set[int]:
    """Indices already in `output`; a torn last line (killed mid-write) is cut off first."""
    done: set[int] = set()
    for line_no, record in read_jsonl(output, repair=True, error=DataError):
        try:
            index = record["index"]
        except (KeyError, TypeError):
            raise DataError(f"{output}:{line_no}: not a line written by respond") from None
        if not (isinstance(index, int) and 0 <= index < len(rows)) or record.get("instruction") != rows[index]["instruction"]:
            raise DataError(f"{output}:{line_no}: row {index} does not match the input file "
                            f"(answers of another input? choose a new --output)")
        done.add(index)
    return done


def _prompt_ids(model, row: dict[str, str]) -> list[int] | None:
    """The row's prompt ids as training rendered such a row; None when they fill the context."""
    try:
        return model.encode_messages(alpaca_messages(row["instruction"], row["input"]))
    except PromptTooLongError:
        return None


def _record(index: int, row: dict[str, str], completion) -> dict:
    record = {"index": index, "instruction": row["instruction"], "input": row["input"]}
    if row.get("output"):
        record["reference"] = row["output"]  # the file's own answer, kept for comparison
    if completion is None:
        return {**record, "output": None, "error": "prompt longer than the model's context"}
    return {**record, "output": completion.text, "finish_reason": completion.finish_reason,
            "prompt_tokens": completion.prompt_tokens, "completion_tokens": len(completion.token_ids)}


def respond(source: str | Path, input_path: str | Path, output_path: str | Path,
            sampling: SamplingConfig = SamplingConfig(), *, batch_size: int = 16,
            progress: bool = True) -> int:
    """Answer the rows of `input_path` not yet in `output_path`; returns how many were answered now."""
    rows = read_records(resolve_data_path(str(input_path)), require_output=False)
    output = Path(output_path)
    done = _answered(output, rows)
    todo = [i for i in range(len(rows)) if i not in done]
    if not todo:
        log.info("respond: all %d rows of %s are already in %s", len(rows), input_path, output)
        return 0
    model = load_model(source)
    # Tokenized once, through the prompt owner (the run's template, checked against the context).
    ids = {i: _prompt_ids(model, rows[i]) for i in todo}
    fits = {i: ids[i] is not None for i in todo}
    output.parent.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm
    with open(output, "a", encoding="utf-8") as out, \
            tqdm(total=len(rows), initial=len(done), desc="respond", unit="row", disable=not progress) as bar:
        synced = time.monotonic()

        def save(indices: list[int], answers: list) -> None:
            """Whole lines, flushed: a kill leaves them plus at most one torn line. fsync (for
            power loss, not kills) at most every FSYNC_EVERY_S, and at the end."""
            nonlocal synced
            out.write("".join(json.dumps(_record(i, rows[i], a), ensure_ascii=False) + "\n"
                              for i, a in zip(indices, answers)))
            out.flush()
            if time.monotonic() - synced >= FSYNC_EVERY_S:
                os.fsync(out.fileno())
                synced = time.monotonic()
            bar.update(len(indices))

        too_long = [i for i in todo if not fits[i]]
        if too_long:
            save(too_long, [None] * len(too_long))
        ok = [i for i in todo if fits[i]]
        for j, completion in stream_rows(model, [Row(ids[i], sampling) for i in ok], batch_size):
            save([ok[j]], [completion])
        os.fsync(out.fileno())
    log.info("respond: answered %d rows (%d were already done) into %s", len(todo), len(done), output)
    return len(todo)
