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
  alpaca-jax export-gguf runs/smoke smoke-q8_0.gguf --type q8_0   # for llama.cpp / llama-server
  alpaca-jax chat runs/smoke                               # talk to a trained run in the terminal
  alpaca-jax respond runs/smoke --input rows.jsonl -o answers.jsonl
  alpaca-jax serve runs/smoke --port 8000                 # OpenAI-compatible API on 127.0.0.1
  alpaca-jax generate configs/generate/alpaca.yaml  # Self-Instruct data through a teacher LLM
  alpaca-jax dedup in.jsonl -o out.jsonl --threshold 0.7
  alpaca-jax curate data.json -o curated.json --judge configs/generate/curate.yaml   # judge-scored curation
  alpaca-jax recipe configs/recipes/alpaca.yaml          # generate -> dedup -> train -> eval -> export, resumable
  alpaca-jax eval runs/a runs/b --data user_oriented_instructions.jsonl -o eval/ab --judge configs/judge/default.yaml
  alpaca-jax eval runs/a --tasks my_mc,my_qa --include-path tasks/ --num-fewshot 5 -o eval/a
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
        epilog="sections: model tokenizer data optimizer train run mesh distributed checkpoint lora preference. "
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

    export_gguf = sub.add_parser(
        "export-gguf", help="write a model as one GGUF file for llama.cpp (llama-server, llama-cpp-python)",
        description="Write RUN as a llama.cpp LLaMA model: weights in llama.cpp's names and layout "
                    "(f32, f16, bf16, or quantized q8_0 / q4_0), the tokenizer that encodes as "
                    "training did, BOS/EOS, and the run's chat template (llama-server --jinja, "
                    "llama-cpp-python create_chat_completion). RUN is a run directory (its latest "
                    "checkpoint), RUN/checkpoints/STEP, an import-hf output or a local Hugging Face "
                    "LLaMA directory. A LoRA run is merged unless --lora says otherwise.",
        epilog="example: alpaca-jax export-gguf runs/alpaca-lora-7b lora.gguf --lora adapter "
               "(then: llama-cli -m base.gguf --lora lora.gguf)")
    export_gguf.add_argument("source", metavar="RUN")
    export_gguf.add_argument("out", metavar="OUT.gguf")
    # Checked by preflight (not argparse `choices`): a bad value is then one line, like every error.
    export_gguf.add_argument("--type", default="f16", metavar="TYPE",
                             help="weight encoding: f32, f16 (default), bf16, q8_0 or q4_0 (norms stay f32)")
    export_gguf.add_argument("--lora", default="merge", metavar="MODE",
                             help="LoRA runs: merge (default: adapters folded into the weights), base (the "
                                  "frozen base alone) or adapter (the adapters alone, a GGUF LoRA file)")

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
        "eval", help="compare runs: perplexity, generations, ROUGE-L, pairwise judge, lm-eval tasks",
        description="For each RUN (run dir, checkpoint, import-hf output, local HF dir, or an "
                    "AlpacaEval model-outputs JSON file): perplexity on FILE's reference answers, "
                    "generations for FILE's instructions saved in AlpacaEval's model-outputs layout, "
                    "ROUGE-L against the references and, with --judge, a pairwise LLM judge of every "
                    "run against the baseline (both answer orders; win rate, bootstrap 95% CI, "
                    "per-category breakdown, position consistency). With --tasks, lm-evaluation-harness "
                    "tasks on the same models (our JAX backend, offline: local task files). Writes "
                    "OUT_DIR/results.json, OUT_DIR/results.md (one row per run) and OUT_DIR/index.html (a "
                    "self-contained page: the table, every answer side by side with the verdicts, loss "
                    "curves). Rerun into the same OUT_DIR to resume: judge replies already paid for come "
                    "from OUT_DIR/judge_journal.jsonl.",
        epilog="FILE layouts: Alpaca JSON/JSONL, Self-Instruct user-oriented JSONL (categories from "
               "motivation_app), AlpacaEval. See README 'Evaluation'.")
    eval_.add_argument("runs", nargs="+", metavar="RUN", help="run dirs, checkpoints, HF dirs or model-outputs JSON files")
    eval_.add_argument("--data", metavar="FILE", help="eval instructions (with or without reference outputs)")
    eval_.add_argument("--safety", metavar="FILE", help="instead of --data: {instruction, label: unsafe|safe} rows; "
                                                        "the judge (--judge) decides refusals: refusal rate on unsafe, "
                                                        "over-refusal on safe prompts, bootstrap 95%% CIs")
    eval_.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="results directory")
    eval_.add_argument("--judge", metavar="CONFIG", help="judge YAML (e.g. configs/judge/default.yaml); omit to skip judging")
    eval_.add_argument("--baseline", help="what every run is judged against: 'references' (default when "
                                          "FILE has outputs) or one RUN (default otherwise: the first)")
    eval_.add_argument("--max-new-tokens", type=int, default=256, help="generation length cap (default 256)")
    eval_.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (default 16)")
    eval_.add_argument("--limit", type=int, help="only the first N instructions, and N documents per task (smoke runs)")
    eval_.add_argument("--tasks", metavar="NAMES",
                       help="lm-evaluation-harness tasks, comma-separated (e.g. arc_easy,my_task): run on our "
                            "JAX backend offline, each task's metrics and stderr added to the run's row")
    eval_.add_argument("--include-path", metavar="DIR", help="a directory of lm-eval task YAML files (local data)")
    eval_.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples per task prompt (default: the task's own)")
    eval_.add_argument("--apply-chat-template", action="store_true",
                       help="render task prompts through the run's chat template (data.template), as chat/serve do")
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
                    "(teacher.base_url=http://HOST:PORT/v1). A chat page for the browser is at "
                    "http://HOST:PORT/ (--no-ui turns it off).")
    serve.add_argument("model", metavar="MODEL", help=model_help)
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve.add_argument("--model-name", help="the `model` name clients send (default: the run directory's name)")
    serve.add_argument("--api-key-env", metavar="NAME",
                       help="require 'Authorization: Bearer $NAME' (the key is read from this environment variable)")
    serve.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most (default 16)")
    serve.add_argument("--no-ui", dest="ui", action="store_false",
                       help="do not serve the chat page at / (the API only)")

    _add_recipe_parser(sub)

    for name, text in (("generate", "generate instruction data with a teacher LLM (Self-Instruct / Alpaca)"),
                       ("dedup", "drop near-duplicate instructions by ROUGE-L (rouge-score semantics)"),
                       ("curate", "keep the rows a judge LLM scores highly (AlpaGasus-style)")):
        sub.add_parser(name, help=text, add_help=False)
    return parser


_RECIPE_HELP = "run the whole pipeline from one YAML, each stage skipped while unchanged"


_RECIPE_TEXTS = dict(
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run RECIPE's stages in order: generate -> dedup -> curate -> train -> preference "
                    "-> eval -> export. Each stage's section is the config its own command takes; "
                    "each writes under RECIPE_DIR/<stage>/ with manifest.json (resolved config, input "
                    "hashes, output hashes, status). A rerun skips every stage whose config and inputs "
                    "are unchanged and whose outputs are complete; a changed key reruns its stage and "
                    "every later one; a killed stage resumes inside. Writes RECIPE_DIR/report.md.",
        epilog="example: alpaca-jax recipe configs/recipes/tiny.yaml dedup.threshold=0.6 --status")


def _add_recipe_parser(sub) -> argparse.ArgumentParser:
    return _add_recipe_arguments(sub.add_parser("recipe", help=_RECIPE_HELP, **_RECIPE_TEXTS))


def _add_recipe_arguments(recipe: argparse.ArgumentParser) -> argparse.ArgumentParser:
    recipe.add_argument("recipe", metavar="RECIPE", help="recipe YAML (e.g. configs/recipes/alpaca.yaml)")
    recipe.add_argument("overrides", nargs="*", help="key=value overrides, e.g. dedup.threshold=0.6 dir=runs/r2")
    recipe.add_argument("--status", action="store_true", help="print each stage: done, stale or pending, and why; run nothing")
    recipe.add_argument("--from", dest="start", metavar="STAGE", help="start at STAGE (earlier stages must be done)")
    recipe.add_argument("--until", metavar="STAGE", help="stop after STAGE")
    return recipe


def _recipe_parser() -> argparse.ArgumentParser:
    """`recipe` alone: its overrides may come before or after the options (parse_intermixed_args
    refuses subparsers, hence this second parser with the same arguments)."""
    parser = argparse.ArgumentParser(prog="alpaca-jax recipe", **_RECIPE_TEXTS)
    parser.set_defaults(command="recipe")
    return _add_recipe_arguments(parser)


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
    if argv and argv[0] in ("generate", "dedup", "curate"):
        from data_gen.cli import main as data_gen_main  # data_gen parses its own arguments
        return data_gen_main(argv)
    if argv and argv[0] == "recipe":
        args = _recipe_parser().parse_intermixed_args(argv[1:])
    else:
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
    for noisy in ("jax._src.xla_bridge", "datasets", "absl", "httpx", "httpx2",  # httpx: one line per judge request
                  "gguf"):  # gguf's writer: "This GGUF file is for Little Endian only", per file
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
    elif args.command == "recipe":
        _recipe(args)
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
    elif args.command == "export-gguf":
        preflight.check_export_gguf(args.source, args.out, args.type, args.lora)
        from alpaca_jax.gguf_export import export_gguf
        export_gguf(args.source, args.out, type=args.type, lora=args.lora)
    elif args.command == "import-hf":
        preflight.check_import_hf(args.hf_dir, args.out_dir)
        from alpaca_jax.hf import import_hf
        import_hf(args.hf_dir, args.out_dir, param_dtype=args.param_dtype, scan_layers=args.scan_layers)
    elif args.command == "eval":
        if args.data is not None and args.safety is not None:
            raise ConfigError("eval takes one of --data FILE and --safety FILE, not both")
        if args.data is None and args.safety is None and args.tasks is None:
            raise ConfigError("nothing to evaluate: give an eval file (--data), a safety file (--safety), "
                              "lm-eval tasks (--tasks), or --data/--safety with --tasks")
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
                                      api_key=api_key_from_env(args.api_key_env), max_batch=args.max_batch,
                                      ui=args.ui))
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


def _recipe(args: argparse.Namespace) -> None:
    from alpaca_jax.recipe import format_status, load_recipe, recipe_status, run_recipe
    recipe = load_recipe(args.recipe, args.overrides)
    if args.status:
        print(format_status(recipe_status(recipe, args.start, args.until)), end="")
    else:
        run_recipe(recipe, args.start, args.until)


def _eval(args: argparse.Namespace) -> None:
    from alpaca_jax.eval import evaluate, load_judge_config, markdown_table
    judge = load_judge_config(args.judge) if args.judge else None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks is not None else None
    results = evaluate(args.runs, args.data or args.safety, args.out, judge=judge, baseline=args.baseline,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit,
                       tasks=tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                       apply_chat_template=args.apply_chat_template, safety=args.safety is not None)
    print(markdown_table(results), end="")


if __name__ == "__main__":
    sys.exit(main())
