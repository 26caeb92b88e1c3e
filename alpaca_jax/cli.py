"""`alpaca-jax`: parse the command line and dispatch to library functions, nothing more."""

from __future__ import annotations

import argparse
import logging
import sys

from alpaca_jax.configlib import ConfigError

EPILOG = """\
examples:
  alpaca-jax train                                  # the embedded default: tiny LLaMA on the bundled seed tasks
  alpaca-jax train configs/tiny.yaml train.max_steps=50 run.dir=runs/smoke
  alpaca-jax train configs/alpaca_7b.yaml tokenizer.path=/models/llama-7b data.train_files=[alpaca_data.json]
  alpaca-jax generate configs/generate/alpaca.yaml  # Self-Instruct data through a teacher LLM
  alpaca-jax dedup in.jsonl -o out.jsonl --threshold 0.7
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alpaca-jax", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Stanford Alpaca in JAX/Flax: generate instruction data, fine-tune LLaMA.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train", help="fine-tune (or train from scratch) a LLaMA on instruction data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train on Alpaca-format data. CONFIG is a YAML file (default: the embedded tiny "
                    "config); any field can then be overridden as section.field=value, e.g. "
                    "train.max_steps=100 optimizer.learning_rate=1e-4 run.dir=runs/x. The run "
                    "directory receives config.yaml, metrics.jsonl, TensorBoard events, the "
                    "tokenizer and summary.json.",
        epilog="sections: model tokenizer data optimizer train run mesh (see README.md)")
    train.add_argument("config", nargs="?", help="YAML config file (optional)")
    train.add_argument("overrides", nargs="*", help="section.field=value overrides")

    for name, text in (("generate", "generate instruction data with a teacher LLM (Self-Instruct / Alpaca)"),
                       ("dedup", "drop near-duplicate instructions by ROUGE-L (rouge-score semantics)")):
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _split_config(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """`train a=b` means overrides only: a first argument containing '=' is not a file."""
    if args.config is not None and "=" in args.config:
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("generate", "dedup"):
        from data_gen.cli import main as data_gen_main  # data_gen parses its own arguments
        return data_gen_main(argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("jax._src.xla_bridge", "datasets", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "train":
            from alpaca_jax.config import load_config
            from alpaca_jax.train import train
            path, overrides = _split_config(args)
            train(load_config(path, overrides))
        return 0
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by the user's config or data: reported in one line, no traceback."""
    from alpaca_jax.data.records import DataError
    from alpaca_jax.train.loop import TrainingError
    return (ConfigError, DataError, TrainingError)


if __name__ == "__main__":
    sys.exit(main())
