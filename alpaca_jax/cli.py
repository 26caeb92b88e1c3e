"""`alpaca-jax`: parse the command line and dispatch to library functions, nothing more."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from alpaca_jax.configlib import ConfigError
from alpaca_jax.errors import UserError

EPILOG = """\
examples:
  alpaca-jax train                                  # the embedded default: tiny LLaMA on the bundled seed tasks
  alpaca-jax train configs/tiny.yaml train.max_steps=50 run.dir=runs/smoke
  alpaca-jax config configs/tiny.yaml train.max_steps=50  # the resolved config, every key explained
  alpaca-jax train configs/alpaca_7b.yaml tokenizer.path=/models/llama-7b data.train_files=[alpaca_data.json]
  alpaca-jax train configs/vicuna_7b.yaml tokenizer.path=/models/llama-7b data.train_files=[sharegpt.json]
  alpaca-jax export-hf runs/smoke hf/smoke                # a run's latest checkpoint -> HF LLaMA dir
  alpaca-jax train configs/alpaca_lora_7b.yaml model.init_from=/models/llama-7b-hf   # LoRA
  alpaca-jax export-peft runs/alpaca-lora-7b adapters/alpaca-lora   # adapters for peft
  alpaca-jax export-hf runs/alpaca-lora-7b hf/alpaca-lora --merge   # merged full weights
  alpaca-jax import-hf /models/llama-2-7b-hf imported/llama2   # HF LLaMA dir -> our params
  alpaca-jax chat runs/smoke                               # talk to a trained run in the terminal
  alpaca-jax respond runs/smoke --input rows.jsonl -o answers.jsonl
  alpaca-jax serve runs/smoke --port 8000                 # OpenAI-compatible API on 127.0.0.1
  alpaca-jax generate configs/generate/alpaca.yaml  # Self-Instruct data through a teacher LLM
  alpaca-jax dedup in.jsonl -o out.jsonl --threshold 0.7
  alpaca-jax eval runs/a runs/b --data user_oriented_instructions.jsonl -o eval/ab --judge configs/judge/default.yaml
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alpaca-jax", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Stanford Alpaca in JAX/Flax: generate instruction data, fine-tune LLaMA.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train", help="fine-tune (or train from scratch) a LLaMA on instruction data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train on Alpaca-format data or conversations (ShareGPT, OpenAI messages, "
                    "OpenAssistant trees; data.template picks the chat template, data.mixture "
                    "weights several sources). CONFIG is a YAML file (default: the embedded tiny "
                    "config); any field can then be overridden as section.field=value, e.g. "
                    "train.max_steps=100 optimizer.learning_rate=1e-4 run.dir=runs/x. The run "
                    "directory receives config.yaml, metrics.jsonl, TensorBoard events, the "
                    "tokenizer and summary.json.",
        epilog="sections: model tokenizer data optimizer train run mesh distributed checkpoint lora. "
               "`alpaca-jax config [CONFIG] [overrides]` prints the resolved config with a comment "
               "on every key. SIGTERM or Ctrl-C saves a checkpoint of the last finished step and "
               "exits with 128+signal; rerun the same command to resume.")
    _add_config_arguments(train)

    config = sub.add_parser(
        "config", help="print the fully resolved config as YAML, every key with its meaning",
        description="Resolve CONFIG (default: the embedded tiny config), its model.preset and the "
                    "overrides exactly as `train` would, and print the result as YAML with each "
                    "key's one-line comment. The output is itself a valid CONFIG.",
        epilog="example: alpaca-jax config configs/alpaca_7b.yaml mesh.fsdp=8 > my_run.yaml")
    _add_config_arguments(config)

    plan = sub.add_parser(
        "plan", help="per-device memory of a config on a mesh, before launching",
        description="Print per-device bytes of parameters, gradients, optimizer state and an "
                    "activation estimate for CONFIG's mesh, and whether it fits --device-memory. "
                    "Allocates nothing (shapes only), so any size can be planned on a laptop.",
        epilog="example: alpaca-jax plan configs/alpaca_7b.yaml mesh.fsdp=8 --device-memory 80GB --devices 8")
    _add_config_arguments(plan)
    plan.add_argument("--device-memory", help="memory per device, e.g. 80GB or 40GiB")
    plan.add_argument("--devices", type=int,
                      help="number of devices to plan for (default: mesh.data*fsdp*tensor when all "
                           "are set, else the devices JAX sees here)")

    export = sub.add_parser(
        "export-hf", help="write a checkpoint as a Hugging Face LLaMA directory",
        description="Write config.json, model.safetensors (sharded with an index above "
                    "--max-shard-size), generation_config.json and the tokenizer files, loadable by "
                    "transformers' AutoModelForCausalLM and AutoTokenizer. SOURCE is a run directory "
                    "(its latest checkpoint), one checkpoint (RUN/checkpoints/STEP) or an import-hf "
                    "output. Streams tensor by tensor: peak memory is about one copy of the weights.")
    export.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT")
    export.add_argument("out_dir", metavar="OUT_DIR")
    export.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the written weights (default: the run's model.param_dtype)")
    export.add_argument("--max-shard-size", default="5GiB", help="largest safetensors file (default 5GiB)")
    export.add_argument("--merge", action="store_true",
                        help="LoRA runs: fold the adapters into the weights (without it a LoRA run "
                             "exports its frozen base, dequantized if quantized)")

    export_peft = sub.add_parser(
        "export-peft", help="write a LoRA run's adapters for Hugging Face peft",
        description="Write adapter_config.json and adapter_model.safetensors, which "
                    "peft.PeftModel.from_pretrained loads on top of the run's base: the original "
                    "HF directory of model.init_from, or `alpaca-jax export-hf RUN BASE_DIR`. "
                    "SOURCE is a LoRA run directory (its latest checkpoint) or one checkpoint.",
        epilog="example: alpaca-jax export-peft runs/alpaca-lora-7b adapters/alpaca-lora-7b")
    export_peft.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT")
    export_peft.add_argument("out_dir", metavar="OUT_DIR")

    import_ = sub.add_parser(
        "import-hf", help="convert a local Hugging Face LLaMA directory to our params",
        description="Read a local HF LLaMA 1/2/3 directory (config.json and one or sharded "
                    "safetensors files) into OUT/params (Orbax), OUT/config.yaml and "
                    "OUT/tokenizer. Train from it with model.init_from=OUT (or give the HF "
                    "directory itself to model.init_from).")
    import_.add_argument("hf_dir", metavar="HF_DIR")
    import_.add_argument("out_dir", metavar="OUT")
    import_.add_argument("--param-dtype", choices=("float32", "bfloat16", "float16"),
                         help="dtype to store the params in (default: the dtype in config.json)")
    import_.add_argument("--no-scan-layers", dest="scan_layers", action="store_false",
                         help="one parameter subtree per layer (model.scan_layers=false)")

    eval_ = sub.add_parser(
        "eval", help="compare runs on an eval file: perplexity, generations, ROUGE-L, pairwise judge",
        description="For each RUN (run dir, checkpoint, import-hf output, local HF dir, or an "
                    "AlpacaEval model-outputs JSON file): perplexity on FILE's reference answers, "
                    "generations for FILE's instructions saved in AlpacaEval's model-outputs layout, "
                    "ROUGE-L against the references and, with --judge, a pairwise LLM judge of every "
                    "run against the baseline (both answer orders; win rate, bootstrap 95% CI, "
                    "per-category breakdown, position consistency). Writes OUT_DIR/results.json and "
                    "OUT_DIR/results.md (one row per run). Rerun into the same OUT_DIR to resume: judge "
                    "replies already paid for come from OUT_DIR/judge_journal.jsonl.",
        epilog="FILE layouts: Alpaca JSON/JSONL, Self-Instruct user-oriented JSONL (categories from "
               "motivation_app), AlpacaEval. See README 'Evaluation'.")
    eval_.add_argument("runs", nargs="+", metavar="RUN", help="run dirs, checkpoints, HF dirs or model-outputs JSON files")
    eval_.add_argument("--data", required=True, metavar="FILE", help="eval instructions (with or without reference outputs)")
    eval_.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="results directory")
    eval_.add_argument("--judge", metavar="CONFIG", help="judge YAML (e.g. configs/judge/default.yaml); omit to skip judging")
    eval_.add_argument("--baseline", help="what every run is judged against: 'references' (default when "
                                          "FILE has outputs) or one RUN (default otherwise: the first)")
    eval_.add_argument("--max-new-tokens", type=int, default=256, help="generation length cap (default 256)")
    eval_.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (default 16)")
    eval_.add_argument("--limit", type=int, help="only the first N instructions (smoke runs)")
    model_help = ("a run directory (latest checkpoint), RUN/checkpoints/STEP, an import-hf output "
                  "or a local Hugging Face LLaMA directory")
    chat = sub.add_parser(
        "chat", help="talk to a model in the terminal (the run's chat template, streamed tokens)",
        description="Interactive chat: each message is answered with the run's chat template "
                    "(data.template); a conversation-trained model sees the earlier turns while "
                    "they fit the context, an Alpaca model answers each message on its own; tokens "
                    "are printed as they are decoded. /reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops "
                    "the answer being written (not the session).")
    chat.add_argument("model", metavar="MODEL", help=model_help)
    chat.add_argument("--system", help="the system prompt: replaces the template's preamble ('Below is an instruction ...' for Alpaca)")
    _add_sampling_arguments(chat, temperature=0.7, top_p=0.9)

    respond = sub.add_parser(
        "respond", help="answer every row of an instruction file (resumable JSONL output)",
        description="Answer each Alpaca row ({instruction, input}) or Self-Instruct instance of "
                    "INPUT with the run's chat template (data.template), as training rendered such rows. Output lines are JSON objects keyed by the "
                    "row's index, appended as each row finishes: rerunning after a crash answers "
                    "only the rows not yet in the output.")
    respond.add_argument("model", metavar="MODEL", help=model_help)
    respond.add_argument("--input", required=True, help="JSON or JSONL rows to answer")
    respond.add_argument("-o", "--output", required=True, help="JSONL file to append answers to")
    respond.add_argument("--batch-size", type=int, default=16, help="prompts decoded together at most (default 16)")
    _add_sampling_arguments(respond, temperature=0.0, top_p=1.0)

    serve = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="GET /v1/models, POST /v1/completions and /v1/chat/completions (stream, n, "
                    "stop, max_tokens, temperature, top_p, seed, usage). Concurrent requests "
                    "share decode steps (a request joins the running batch at the next step). "
                    "Usable as the teacher of `alpaca-jax generate` "
                    "(teacher.base_url=http://HOST:PORT/v1).")
    serve.add_argument("model", metavar="MODEL", help=model_help)
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve.add_argument("--model-name", help="the `model` name clients send (default: the run directory's name)")
    serve.add_argument("--api-key-env", metavar="NAME",
                       help="require 'Authorization: Bearer $NAME' (the key is read from this environment variable)")
    serve.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most (default 16)")

    for name, text in (("generate", "generate instruction data with a teacher LLM (Self-Instruct / Alpaca)"),
                       ("dedup", "drop near-duplicate instructions by ROUGE-L (rouge-score semantics)")):
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float, top_p: float) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated at most per answer (default 256)")
    parser.add_argument("--temperature", type=float, default=temperature,
                        help=f"softmax temperature, 0 = greedy (default {temperature})")
    parser.add_argument("--top-p", type=float, default=top_p, help=f"nucleus sampling mass (default {top_p})")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off (default)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")


def _sampling(args: argparse.Namespace):
    from alpaca_jax.infer import SamplingConfig
    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file (optional)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")


def _split_config(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """`train a=b` means overrides only: a first argument containing '=' is not a file."""
    if args.config is not None and "=" in args.config:
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def main(argv: list[str] | None = None) -> int:
    is_process = argv is None  # a real `alpaca-jax` process, not a call from Python
    if is_process and sys.argv[1:2] == ["train"]:
        # A real `alpaca-jax train` process (not a call from Python): restart it once with
        # glibc tuned so XLA's per-step host buffers are reused (see host_malloc.py).
        from alpaca_jax.host_malloc import maybe_reexec_with_host_malloc_tuning
        maybe_reexec_with_host_malloc_tuning()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("generate", "dedup"):
        from data_gen.cli import main as data_gen_main  # data_gen parses its own arguments
        return data_gen_main(argv)
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as e:  # bad config, data, disk or request: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        code = getattr(e, "exit_code", 2)  # 2 for bad input; 128+signal for an interrupted run
        if is_process and getattr(e, "abandon_threads", False):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # see CheckpointError.abandon_threads: nothing is left to write
        return code
    except KeyboardInterrupt:  # Ctrl-C before training started: nothing to save
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("jax._src.xla_bridge", "datasets", "absl", "httpx", "httpx2"):  # httpx: one line per judge request
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Each command checks its config and output paths before importing JAX (seconds), so bad
    # input fails fast; the library functions check them again for callers without the CLI.
    from alpaca_jax import preflight
    from alpaca_jax.config import load_config
    if args.command == "train":
        cfg = load_config(*_split_config(args))
        preflight.check_train_outputs(cfg)
        from alpaca_jax.train import train
        train(cfg)
    elif args.command == "config":
        from alpaca_jax.configlib import commented_yaml
        print(commented_yaml(load_config(*_split_config(args))), end="")
    elif args.command == "plan":
        _plan(args)
    elif args.command == "export-hf":
        from alpaca_jax.configlib import parse_bytes
        max_shard_size = parse_bytes(args.max_shard_size)
        preflight.check_export_hf(args.source, args.out_dir)
        from alpaca_jax.hf import export_hf
        export_hf(args.source, args.out_dir, dtype=args.dtype, max_shard_size=max_shard_size, merge=args.merge)
    elif args.command == "export-peft":
        preflight.check_export_hf(args.source, args.out_dir)
        from alpaca_jax.hf import export_peft
        export_peft(args.source, args.out_dir)
    elif args.command == "import-hf":
        preflight.check_import_hf(args.hf_dir, args.out_dir)
        from alpaca_jax.hf import import_hf
        import_hf(args.hf_dir, args.out_dir, param_dtype=args.param_dtype, scan_layers=args.scan_layers)
    elif args.command == "eval":
        preflight.check_model_sources(args.runs, "run")
        preflight.check_output_dir(args.out, "-o/--out")
        _eval(args)
    elif args.command == "chat":
        preflight.check_model_sources([args.model], "model directory")
        from alpaca_jax.chat import chat
        from alpaca_jax.infer import load_model
        chat(load_model(args.model), _sampling(args), system=args.system)
    elif args.command == "respond":
        preflight.check_model_sources([args.model], "model directory")
        preflight.check_output_file(args.output, "-o/--output")
        from alpaca_jax.respond import respond
        respond(args.model, args.input, args.output, _sampling(args), batch_size=args.batch_size)
    elif args.command == "serve":
        preflight.check_model_sources([args.model], "model directory")
        from alpaca_jax.serve import ServeConfig, api_key_from_env, serve
        serve(args.model, ServeConfig(host=args.host, port=args.port, model_name=args.model_name,
                                      api_key=api_key_from_env(args.api_key_env), max_batch=args.max_batch))
    return 0


def _plan(args: argparse.Namespace) -> None:
    from alpaca_jax.config import load_config
    from alpaca_jax.configlib import parse_bytes
    cfg = load_config(*_split_config(args))
    memory = parse_bytes(args.device_memory) if args.device_memory else None
    if args.devices is not None and args.devices <= 0:
        raise ConfigError(f"--devices must be positive, got {args.devices}")
    from alpaca_jax.train.plan import format_plan, plan_memory
    devices = args.devices
    if devices is None:
        sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        if -1 in sizes:
            import jax
            devices = jax.device_count()
        else:
            devices = sizes[0] * sizes[1] * sizes[2]
    print(format_plan(plan_memory(cfg, devices), cfg, memory))


def _eval(args: argparse.Namespace) -> None:
    from alpaca_jax.eval import evaluate, load_judge_config, markdown_table
    judge = load_judge_config(args.judge) if args.judge else None
    results = evaluate(args.runs, args.data, args.out, judge=judge, baseline=args.baseline,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit)
    print(markdown_table(results), end="")


if __name__ == "__main__":
    sys.exit(main())
