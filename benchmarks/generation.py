"""Benchmark: text generation, ours (JAX, KV cache) vs transformers `generate` (PyTorch CPU, KV
cache), on the same weights; and `serve` under concurrent streaming clients vs one at a time.

Two shapes with random weights (init std 0.02), exported with `alpaca_jax.hf.export_hf` so both
sides load the very same tensors:
    tiny   the `tiny` preset (hidden 128, 4 layers, 4 heads / 2 KV heads, vocab 2048; 1.3M params)
    30m    hidden 512, 8 layers, 8 heads, intermediate 1408, vocab 8192 (34.1M params), the
           train-throughput benchmark's shape
Decode: greedy, a 32-token prompt, N new tokens (EOS disabled on both sides, so every row runs
all N steps), batch 1 and 16; tokens/s = batch * N / wall time of the whole call (prefill
included), after an untimed warm-up call (compilation on our side; a 4-token call on transformers', which
compiles nothing). The best of `--repeats` timed calls per side, the two sides alternating.
Serve: 16 clients streaming completions (greedy, `--serve-tokens` each, distinct prompts)
from `alpaca-jax serve` of the 30m shape (its own process, as users run it), all at once vs one
after another, three rounds alternating (the best of each): requests/s and time to first token
(p50, p99).

    python benchmarks/generation.py            # ~5 min; writes benchmarks/results/generation.json
    python benchmarks/generation.py --quick    # smoke run: tiny shape, fewer tokens

On an accelerator (`--gpu`, run by benchmarks/gpu.sh): decode only, bf16 weights and compute on
both sides, the TinyLlama 1.1B shape (`--quick`: the tiny shape, which also runs on CPU), batch
1 and 32; transformers `generate` with its static cache (`cache_implementation="static"`, the
forward eager; `--hf-compile` adds `torch.compile` of the forward, as transformers documents
for the static cache, at a minute or more of compile per batch size):

    python benchmarks/generation.py --gpu      # writes benchmarks/results/generation_gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import load_average, machine  # noqa: E402  (this folder, on sys.path)

SHAPES = {
    "tiny": dict(preset="tiny"),
    "30m": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                num_kv_heads=8, max_position_embeddings=2048),
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                      num_kv_heads=4, max_position_embeddings=2048),
}
BF16 = dict(dtype="bfloat16", param_dtype="bfloat16")  # --gpu: bf16 weights and compute, as HF's bf16 model
PROMPT_TOKENS = 32


class _NoEos:
    """The model's tokenizer with an EOS id outside the vocabulary: every row decodes N tokens."""

    def __init__(self, tokenizer, vocab: int):
        self._tokenizer, self.eos_token_id, self.pad_token_id = tokenizer, vocab + 1, 0

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def _make_run(root: Path, shape: str, overrides: dict | None = None) -> Path:
    """A run directory with random weights and a byte-level BPE, plus its HF export."""
    import jax
    import numpy as np
    from alpaca_jax.checkpoint import save_params
    from alpaca_jax.config import config_from_dict, save_config
    from alpaca_jax.data.templates import alpaca_prompt
    from alpaca_jax.data.tokenizer import train_bpe_tokenizer
    from alpaca_jax.hf import export_hf
    from alpaca_jax.model import init_params

    cfg = config_from_dict({"model": {**SHAPES[shape], **(overrides or {})}})
    run = root / shape
    run.mkdir(parents=True)
    save_params(run, init_params(cfg.model, jax.random.key(0)))
    # Random words as well as prompts, so the BPE fills the model's whole vocabulary: a random
    # model's tokens then all decode to text (streamed text, and so time to first token, would
    # otherwise wait on tokens the tokenizer does not have).
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(max(60_000, 3 * cfg.model.vocab_size))]
    texts = [alpaca_prompt(f"Explain the number {i} in words.") for i in range(100)]
    texts += [" ".join(words[i:i + 20]) for i in range(0, len(words), 20)]
    tokenizer = train_bpe_tokenizer(texts, cfg.model.vocab_size, 1)
    assert len(tokenizer) == cfg.model.vocab_size, len(tokenizer)
    tokenizer.save_pretrained(str(run / "tokenizer"))
    save_config(cfg, run / "config.yaml")
    export_hf(run, root / f"{shape}-hf")
    return run


def _prompts(batch: int, vocab: int, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    return [list(rng.integers(4, min(vocab, 512), PROMPT_TOKENS)) for _ in range(batch)]


def _ours_call(model, batch: int, new_tokens: int):
    """A function that decodes the batch once and returns its wall time (compiled here first)."""
    from alpaca_jax.infer import Row, SamplingConfig, decode_rows
    rows = [Row([model.tokenizer.bos_token_id] + p, SamplingConfig(max_new_tokens=new_tokens))
            for p in _prompts(batch, model.config.vocab_size)]
    max_batch = max(16, batch)
    decode_rows(model, rows, max_batch=max_batch)  # compile

    def call() -> float:
        start = time.perf_counter()
        done = decode_rows(model, rows, max_batch=max_batch)
        elapsed = time.perf_counter() - start
        assert all(len(c.token_ids) == new_tokens for c in done)
        return elapsed
    return call


def _hf_call(hf_model, batch: int, new_tokens: int, vocab: int, bos: int, static_cache: bool = False):
    """The same for transformers `generate` (after a warm-up call: 4 tokens with the dynamic
    cache, which compiles nothing; the full length with the static cache, whose buffers are
    sized for it and, with --hf-compile, whose compiled forward is built then)."""
    import torch
    device = next(hf_model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ids = torch.tensor([[bos] + p for p in _prompts(batch, vocab)], device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=vocab + 1,
                  pad_token_id=0, use_cache=True)
    if static_cache:
        kwargs["cache_implementation"] = "static"
    warm = new_tokens if static_cache else 4
    with torch.inference_mode():
        hf_model.generate(ids, max_new_tokens=warm, min_new_tokens=warm, **kwargs)
    sync()

    def call() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            out = hf_model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            sync()
            elapsed = time.perf_counter() - start
        assert out.shape[1] == ids.shape[1] + new_tokens
        return elapsed
    return call


def _interleaved_best(calls: dict, repeats: int) -> dict:
    """Each call `repeats` times, alternating between them (so a slow spell of the machine hits
    both sides alike); the best time of each."""
    best = {name: float("inf") for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            best[name] = min(best[name], call())
    return best


def _percentile(values, q: float) -> float:
    import numpy as np
    return float(np.percentile(np.asarray(values), q))


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _ServeProcess:
    """`alpaca-jax serve RUN` in its own process, as a user runs it (the clients here then do
    not share the server's Python interpreter)."""

    def __init__(self, run: Path):
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._command = [sys.executable, "-m", "alpaca_jax.cli", "serve", str(run), "--port", str(self.port),
                         "--model-name", "bench", "--max-batch", "16"]

    def __enter__(self) -> "_ServeProcess":
        import subprocess
        import urllib.request
        self._process = subprocess.Popen(self._command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"serve exited: {self._process.stderr.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.base_url}/models", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("serve did not start within 300 s")

    def __exit__(self, *exc) -> None:
        self._process.terminate()
        self._process.wait(timeout=60)


def _serve(run: Path, clients: int, new_tokens: int, rounds: int = 3) -> dict:
    """Streaming clients against `serve`: the requests one at a time, then all at once, `rounds`
    times alternating; the best round of each mode."""
    import openai
    prompts = [f"Explain the number {i} in words." for i in range(clients)]
    with _ServeProcess(run) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=600)

        def one(prompt: str, ttft: list, texts: list, n: int = 1):
            start = time.perf_counter()
            stream = client.completions.create(model="bench", prompt=prompt, max_tokens=new_tokens,
                                               temperature=0, stream=True, n=n)
            first, pieces = None, []
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text and first is None:
                    first = time.perf_counter() - start
                pieces.extend(c.text for c in chunk.choices)
            ttft.append(first if first is not None else time.perf_counter() - start)
            texts.append("".join(pieces))

        def concurrently():
            ttft: list[float] = []
            texts: list[str] = []
            threads = [threading.Thread(target=one, args=(p, ttft, texts)) for p in prompts]
            [t.start() for t in threads]
            [t.join() for t in threads]
            return ttft, texts

        # Compile outside the timings: every batch bucket (n rows at once), then one concurrent
        # round (the shapes rows joining a running batch meet).
        for n in (1, 2, 4, 8, 16):
            one(prompts[0], [], [], n)
        concurrently()
        results = {}
        for _ in range(rounds):  # alternating; each mode's best round counts
            for mode in ("sequential", "concurrent"):
                start = time.perf_counter()
                if mode == "sequential":
                    ttft, texts = [], []
                    for p in prompts:
                        one(p, ttft, texts)
                else:
                    ttft, texts = concurrently()
                elapsed = time.perf_counter() - start
                if mode not in results or clients / elapsed > results[mode]["requests_per_s"]:
                    results[mode] = {"requests_per_s": clients / elapsed, "wall_s": elapsed,
                                     "ttft_p50_s": _percentile(ttft, 50), "ttft_p99_s": _percentile(ttft, 99)}
                results[f"{mode}_texts"] = sorted(texts)
    same = results.pop("sequential_texts") == results.pop("concurrent_texts")
    return {**results, "same_texts": same, "clients": clients, "max_tokens": new_tokens,
            "speedup": results["concurrent"]["requests_per_s"] / results["sequential"]["requests_per_s"]}


def _decode_table(tmp: Path, shape: str, batches, new_tokens: int, repeats: int, device_mode: bool,
                  hf_compile: bool) -> dict:
    """Ours vs transformers `generate` on one shape, per batch size (interleaved, best of `repeats`)."""
    import torch
    from transformers import AutoModelForCausalLM
    from alpaca_jax.infer import load_model
    from alpaca_jax.model import count_params

    run = _make_run(tmp, shape, BF16 if device_mode else None)
    model = load_model(run)
    model = dataclasses.replace(model, tokenizer=_NoEos(model.tokenizer, model.config.vocab_size))
    rows = {"params": count_params(model.config), "dtype": model.config.dtype}
    hf_device = "cuda" if device_mode and torch.cuda.is_available() else "cpu"
    hf_model = AutoModelForCausalLM.from_pretrained(tmp / f"{shape}-hf", local_files_only=True,
                                                    dtype=torch.bfloat16 if device_mode else torch.float32)
    hf_model = hf_model.to(hf_device).eval()
    if hf_compile:  # as transformers documents for the static cache
        hf_model.forward = torch.compile(hf_model.forward, mode="reduce-overhead", fullgraph=True)
    rows["transformers"] = {"device": hf_device, "cache": "static" if device_mode else "dynamic",
                            "torch_compile": hf_compile}
    for batch in batches:
        calls = {"ours": _ours_call(model, batch, new_tokens),
                 "theirs": _hf_call(hf_model, batch, new_tokens, model.config.vocab_size,
                                    model.tokenizer.bos_token_id, static_cache=device_mode)}
        best = _interleaved_best(calls, repeats)
        ours, theirs = batch * new_tokens / best["ours"], batch * new_tokens / best["theirs"]
        rows[f"batch_{batch}"] = {"ours_tokens_per_s": ours, "transformers_tokens_per_s": theirs,
                                  "ratio": ours / theirs}
        print(f"{shape} batch {batch}: ours {ours:.0f} tok/s, transformers {theirs:.0f} tok/s "
              f"({ours / theirs:.2f}x)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shape only, fewer tokens (smoke run)")
    parser.add_argument("--gpu", action="store_true",
                        help="decode only, bf16, TinyLlama shape (quick: tiny), batch 1 and 32, HF with its static cache")
    parser.add_argument("--hf-compile", action="store_true", help="with --gpu: torch.compile HF's forward too")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per row (default 64)")
    parser.add_argument("--serve-tokens", type=int, default=48, help="max_tokens per serve request (default 48)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed calls per side, ours and transformers' alternating; the best counts (default 5)")
    parser.add_argument("--out", help="the JSON written (default benchmarks/results/generation[_gpu].json)")
    args = parser.parse_args()
    load_before = load_average()
    if args.gpu:
        shapes, batches = (["tiny"] if args.quick else ["tinyllama"]), (1, 32)
    else:
        shapes, batches = (["tiny"] if args.quick else ["tiny", "30m"]), (1, 16)
    new_tokens = 16 if args.quick else args.new_tokens
    serve_tokens = 8 if args.quick else args.serve_tokens
    out = Path(args.out or REPO / "benchmarks" / "results" / f"generation{'_gpu' if args.gpu else ''}.json")

    import jax
    import torch
    device = jax.devices()[0]
    report = {"machine": machine(load_before), "jax": jax.__version__,
              "jax_device": device.device_kind, "torch": torch.__version__,
              "torch_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch_threads": torch.get_num_threads(), "new_tokens": new_tokens,
              "prompt_tokens": PROMPT_TOKENS + 1, "repeats": args.repeats, "decode": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            report["decode"][shape] = _decode_table(Path(tmp), shape, batches, new_tokens, args.repeats,
                                                    args.gpu, args.hf_compile)
        if not args.gpu:
            serve_shape = shapes[-1]
            report["serve"] = {"shape": serve_shape, **_serve(Path(tmp) / serve_shape, 16, serve_tokens)}
            s = report["serve"]
            print(f"serve ({serve_shape}, 16 streaming clients, {serve_tokens} tokens): concurrent "
                  f"{s['concurrent']['requests_per_s']:.2f} req/s vs sequential {s['sequential']['requests_per_s']:.2f} "
                  f"({s['speedup']:.1f}x); TTFT p50/p99 concurrent {s['concurrent']['ttft_p50_s']:.3f}/"
                  f"{s['concurrent']['ttft_p99_s']:.3f} s, sequential {s['sequential']['ttft_p50_s']:.3f}/"
                  f"{s['sequential']['ttft_p99_s']:.3f} s; same texts: {s['same_texts']}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
