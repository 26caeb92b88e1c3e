"""`alpaca-jax generate`, `dedup` and `curate` (also `python -m data_gen`): parse, dispatch.

Config and usage errors print one line `error: ...` to stderr and return 2. A generate run that
ends before its target prints one line and returns the code of its stop (`EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import json
import sys

from alpaca_jax.configlib import ConfigError
from alpaca_jax.errors import UserError

__all__ = ["main", "EXIT_CODES"]

# Exit codes of `generate`, by report["stop"]; 2 is a bad config or usage.
EXIT_CODES = {
    "target": 0,        # the requested number of instructions was reached, every task complete
    "no_progress": 1,   # the teacher gave no usable answer (dead endpoint, garbage), or refused
    "budget": 3,        # budget.max_requests / max_tokens / max_cost_usd reached: data.json holds
                        # every completed task; raise the cap and rerun to continue
    "max_rounds": 4,    # pipeline.max_rounds reached before the target: data.json written
}

GENERATE_HELP = """\
Generate instruction-following data with a teacher LLM and write Alpaca-format JSON.

CONFIG is a YAML file (see alpaca_jax/configs/generate/alpaca.yaml and self_instruct.yaml);
any key can be overridden as section.field=value, e.g.
  teacher.base_url=http://localhost:8000/v1 teacher.model=meta-llama/Llama-3.1-8B-Instruct
  pipeline.num_instructions=500 output.dir=runs/gen budget.max_tokens=2000000
The API key is read from the environment variable named by teacher.api_key_env
(default OPENAI_API_KEY; any dummy value for a local server).

The output directory gets journal.jsonl (every completed response, fsync'ed), data.json and
report.json. Rerun the same command after a crash or kill to resume: completed requests are
replayed from the journal, never sent again.

Exit codes: 0 target reached; 1 the teacher refused (bad key, unknown model) or gave no usable
answer for pipeline.max_idle_rounds batches in a row (dead endpoint, garbage); 2 bad config;
3 a budget cap was reached (data.json holds every completed task); 4 pipeline.max_rounds was
reached before the target. Every stop but 0 prints one line; the journal stays intact and
the same command resumes."""

DEDUP_HELP = """\
Drop near-duplicate instructions: an instruction is dropped when its ROUGE-L F-measure
against any earlier *kept* instruction exceeds the threshold (the first of near-duplicates
is kept, in file order). Decisions are identical to rouge_score's RougeScorer(['rougeL'])
(same tokenizer, same LCS, same float arithmetic), computed with prefix filtering and a
bit-parallel LCS. IN is JSONL (one object per line, or one string) or a JSON array;
the output has the same format with the dropped records removed."""


CURATE_HELP = """\
Rate every (instruction, input, output) row of DATA with a judge LLM (accuracy and
helpfulness, 1-5, AlpaGasus-style; the prompt is in data_gen/judging.py) and keep the rows
scored at least --min-score. DATA is a JSON array (the released alpaca_data.json, our
data.json) or JSONL. Writes OUT (the kept rows), OUT's stem + .scores.jsonl (every row with
its score; null when the reply had no score line, or no reply came), + .report.json (counts,
score histogram) and + .journal.jsonl (every rating paid for). Rerun the same command after a
kill: ratings in the journal are not paid again.

CONFIG is a YAML with `judge` (a teacher block), `sampling` and `budget` sections (see
alpaca_jax/configs/generate/curate.yaml); overrides as section.field=value.

Exit codes: 0 every row rated (unparseable replies are counted in the report, not retried);
1 the judge refused, or some ratings failed after their retries; 2 bad input; 3 a budget cap
stopped the rating (OUT holds the rows kept so far)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alpaca-jax", description="Self-Instruct / Alpaca data generation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    gen = sub.add_parser("generate", help="generate instruction data with a teacher LLM",
                         description=GENERATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("config", help="YAML config file")
    gen.add_argument("overrides", nargs="*", help="section.field=value overrides")
    dedup = sub.add_parser("dedup", help="drop near-duplicate instructions by ROUGE-L",
                           description=DEDUP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    dedup.add_argument("input", metavar="IN", help="input .jsonl or .json")
    dedup.add_argument("-o", "--output", required=True, metavar="OUT", help="output file")
    dedup.add_argument("--threshold", type=float, default=0.7,
                       help="drop when ROUGE-L F > this (default 0.7)")
    dedup.add_argument("--tokenizer", choices=("rouge", "unicode"), default="rouge",
                       help="rouge: rouge-score's ASCII tokenizer (default); unicode: letters of "
                            "any script, one token per CJK character")
    dedup.add_argument("--field", default="instruction", help="record field to compare (default: instruction)")
    dedup.set_defaults(handler=_dedup)
    gen.set_defaults(handler=_generate)
    curate = sub.add_parser("curate", help="keep the rows a judge LLM scores highly (AlpaGasus)",
                            description=CURATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    curate.add_argument("data", metavar="DATA", help="rows to rate: .json array or .jsonl")
    curate.add_argument("-o", "--output", required=True, metavar="OUT", help="kept rows (JSON array)")
    curate.add_argument("--judge", required=True, metavar="CONFIG", help="judge YAML (judge, sampling, budget)")
    curate.add_argument("--min-score", type=float, default=4.5, help="keep rows scored >= this (1-5, default 4.5)")
    curate.add_argument("overrides", nargs="*", help="section.field=value overrides of CONFIG")
    curate.set_defaults(handler=_curate)
    return parser


def _generate(args: argparse.Namespace) -> int:
    from data_gen.config import load_config
    from data_gen.generate import generate
    from alpaca_jax.llm.client import TeacherFatalError

    config = load_config(args.config, args.overrides)
    try:
        report = generate(config)
    except TeacherFatalError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CODES["no_progress"]
    stop = report["stop"]
    written = f"wrote {config.output.dir}/data.json ({report['kept']} examples) and report.json"
    if stop == "no_progress":
        print(f"error: {report['stop_reason']}", file=sys.stderr)
    elif stop != "target":
        cap = "budget.*" if stop == "budget" else "pipeline.max_rounds"
        print(f"stopped: {report['stop_reason']}; {written}; raise {cap} and rerun the same "
              "command to continue", file=sys.stderr)
    else:
        summary = {k: report[k] for k in ("stop_reason", "kept", "candidates", "dropped", "tokens")}
        summary["garbage_requests"] = report["requests"]["garbage_total"]
        print(json.dumps(summary), file=sys.stderr)
        print(written, file=sys.stderr)
    return EXIT_CODES[stop]


def _dedup(args: argparse.Namespace) -> int:
    from pathlib import Path

    from alpaca_jax.files import check_writable_file
    from data_gen.dedup import dedup_file

    if not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold must be in [0, 1], got {args.threshold}")
    if not Path(args.input).is_file():
        raise ConfigError(f"input file not found: {args.input}")
    check_writable_file(args.output, "-o", ConfigError)
    try:
        result = dedup_file(Path(args.input), Path(args.output), args.threshold, args.tokenizer, args.field)
    except ValueError as e:  # JSON errors and records without the field
        raise ConfigError(" ".join(str(e).split())) from None
    total = len(result.kept) + len(result.dropped)
    print(f"kept {len(result.kept)} of {total} ({len(result.dropped)} near-duplicates dropped) -> {args.output}",
          file=sys.stderr)
    return 0


def _curate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from alpaca_jax.files import check_writable_file
    from data_gen.config import load_curate_config
    from data_gen.curate import curate_file
    from data_gen.generate import bar_factory
    from alpaca_jax.llm.client import TeacherFatalError

    if not 1.0 <= args.min_score <= 5.0:
        raise ConfigError(f"--min-score must be in [1, 5], got {args.min_score}")
    if not Path(args.data).is_file():
        raise ConfigError(f"input file not found: {args.data}")
    if not Path(args.judge).is_file():
        raise ConfigError(f"judge config not found: {args.judge}")
    config = load_curate_config(args.judge, args.overrides)
    check_writable_file(args.output, "-o", ConfigError)
    try:
        report = curate_file(Path(args.data), Path(args.output), config, args.min_score,
                             bar=bar_factory(sys.stderr.isatty()))
    except ValueError as e:     # JSON errors and rows without instruction/output
        raise ConfigError(" ".join(str(e).split())) from None
    except TeacherFatalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    line = (f"kept {report['kept']} of {report['rows']} rows scored >= {args.min_score} -> {args.output} "
            f"({report['unparseable']} replies without a score line)")
    if report["not_sent"]:
        print(f"stopped: {report['budget_stop']}; {report['not_sent']} rows not rated; {line}; raise "
              "budget.* and rerun the same command to continue", file=sys.stderr)
        return 3
    if report["failed"]:
        print(f"error: {report['failed']} ratings failed after their retries (last error: "
              f"{report['this_run']['last_error']}); {line}; rerun the same command to finish", file=sys.stderr)
        return 1
    print(line, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    # argparse takes `curate`'s overrides only right after DATA; accept them after the options too.
    if extra and (args.command != "curate" or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.handler(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
