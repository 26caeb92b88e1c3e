"""Our models as an lm-evaluation-harness backend (`lm_eval.api.model.LM`), on JAX decoding.

Requests are tokenized exactly as lm-eval's own `hf` backend tokenizes them (`TemplateLM`'s
context/continuation split, its rolling windows, its stop-sequence and generation-length rules),
with the run's tokenizer and BOS rule (`LoadedModel.encode`: BOS when training added one, as
the exported tokenizer does), so the same task gives the same token ids on both backends.

Log-likelihoods are computed differently from the `hf` backend, for speed, with the same result:
a multiple-choice question asks for one context with several continuations, and the `hf`
backend runs the whole context once per choice. Here each distinct context is run once into a
KV cache (its last position gives the first continuation token's log-probabilities), then every
continuation runs over a copy of its context's cache rows; the output head and the softmax are
computed only where a continuation token is scored. Contexts are batched longest first (as
`hf` sorts its requests), in the shape buckets decoding uses (infer/cache.py), so a task
compiles a handful of shapes. Generation is `infer.stream_rows` (greedy unless the task samples).

On a mesh (`load_model(source, mesh)`) the weights lie where training put them and XLA places
the activations: the same functions run sharded.

    import lm_eval
    from lm_eval.tasks import TaskManager
    from alpaca_jax.eval.lm_eval_backend import AlpacaJaxLM
    from alpaca_jax.infer import load_model
    lm = AlpacaJaxLM(load_model("runs/smoke"))
    out = lm_eval.simple_evaluate(model=lm, tasks=["my_task"], task_manager=TaskManager(include_path="tasks/"))

Not here: choosing and checking tasks, and the results table (harness.py).
"""

from __future__ import annotations

import functools
import sys
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, \
    postprocess_generated_text
from tqdm.auto import tqdm

from alpaca_jax.infer.cache import bucket, cache_bucket, init_cache, prompt_bucket
from alpaca_jax.data.prompt import render_prompt
from alpaca_jax.infer.decode import Row, stream_rows
from alpaca_jax.infer.loader import LoadedModel, load_model
from alpaca_jax.infer.sampling import SamplingConfig
from alpaca_jax.model import Llama

__all__ = ["AlpacaJaxLM"]

MIN_CONTINUATION_BUCKET = 4   # shortest continuation length compiled for (tokens fed after a context)
DEFAULT_MAX_GEN_TOKS = 256    # lm-eval's `hf` default when a task sets no max_gen_toks
DEFAULT_BATCH_SIZE = 16       # contexts scored (or rows generated) together


@functools.partial(jax.jit, static_argnames=("model",))
def _run_contexts(params, ids, lengths, cache, *, model: Llama):
    """Right-padded contexts [C, T] -> the log-probabilities after each context's last token
    [C, V] (fp32) and the cache holding the contexts (slots 0..T-1)."""
    batch, length = ids.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    logits, cache = model.apply({"params": params}, ids, positions, None, cache=cache, logits_at=lengths - 1)
    return jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1), cache


@functools.partial(jax.jit, static_argnames=("model",))
def _score_continuations(params, cache, context_of, fed, starts, targets, valid, *, model: Llama):
    """Continuation tokens after their contexts -> (summed log-prob [R], all greedy [R]).

    cache: per layer [C, K, S, H], the contexts; context_of [R]: each row's context;
    fed [R, L]: the continuation's tokens but the last, fed at positions starts[r] + 0..L-1;
    targets [R, L]: the tokens they predict (the continuation's tokens but the first);
    valid [R, L]: which of the L positions are real (rows are right-padded).
    """
    rows = jax.tree.map(lambda c: c[context_of], cache)  # [R, K, S, H]: each row's own copy
    positions = starts[:, None] + jnp.arange(fed.shape[1], dtype=jnp.int32)[None, :]
    logits, _ = model.apply({"params": params}, fed, positions, None, cache=rows)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [R, L, V]
    scored = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = (jnp.argmax(logp, axis=-1) == targets) | ~valid
    return jnp.where(valid, scored, 0.0).sum(axis=1), greedy.all(axis=1)


@register_model("alpaca-jax")
class AlpacaJaxLM(TemplateLM):
    """An lm-eval model over a `LoadedModel` (or a run directory / HF directory to load).

    `batch_size` counts contexts run together (their continuations follow in one more call) and
    rows generated together. From lm-eval's own CLI: `--model alpaca-jax --model_args
    pretrained=runs/smoke,batch_size=16` once this module is imported.
    """

    def __init__(self, model: LoadedModel | None = None, *, pretrained: str | None = None,
                 batch_size: int | str = DEFAULT_BATCH_SIZE, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, mesh=None,
                 progress: bool | None = None, device: str | None = None, max_batch_size: int | None = None):
        # `device` and `max_batch_size` are what lm-eval's CLI passes every backend; JAX places
        # the model itself (`mesh`), and batches have a fixed size, so both are ignored.
        super().__init__()
        if (model is None) == (pretrained is None):
            raise ValueError("give either a loaded model or pretrained=PATH")
        self.model = model if model is not None else load_model(pretrained, mesh=mesh)
        self.tokenizer = self.model.tokenizer
        # lm-eval's "auto" searches for the largest batch that fits; ours is a fixed size.
        self.batch_size = DEFAULT_BATCH_SIZE if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self._llama = Llama(self.model.config, None, self.model.attention_layout)
        self._progress = sys.stderr.isatty() if progress is None else progress

    # -- tokens ------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.model.eos_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context is conditioned on (and rolling windows start from): BOS, as the
        # `hf` backend does, or EOS for a tokenizer without one.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.model.eos_id

    @property
    def max_length(self) -> int:
        return self.model.max_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Ids as training built them: BOS when the run added one (unless the text already starts
        with the BOS string, or add_special_tokens=False), then the text without specials."""
        with_bos = add_special_tokens is not False and not (
            add_special_tokens is None and has_bos_prefix(string, self.tokenizer.bos_token))
        ids = (self.model.encode(string) if with_bos
               else list(self.tokenizer(string, add_special_tokens=False)["input_ids"]))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- chat ----------------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return f"{self.model.name}__{self.model.template}".replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The name of the run's template (recorded in lm-eval's results and cache keys)."""
        return self.model.template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the run's template renders it (the prompt owner, data/prompt.py).
        Without a generation prompt the last (assistant) message is continued: its text is
        appended after the prompt that asks for it."""
        if not add_generation_prompt and chat_history and chat_history[-1]["role"] == "assistant":
            head, tail = chat_history[:-1], chat_history[-1]["content"]
        else:
            head, tail = chat_history, ""
        return render_prompt(head, self.model.template, self.tokenizer) + tail

    # -- log-likelihoods -----------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # TemplateLM tokenizes under a progress bar of its own: quiet too when not on a terminal.
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self._progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """[((context, continuation) or None, context ids, continuation ids)] -> (log-prob, greedy)
        per request, in order. Too long a pair loses tokens on the left, as in `hf`."""
        by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
        continuations = []
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(f"request {i}: empty context or continuation, or a continuation "
                                 f"longer than the {self.max_length}-token context")
            window = (list(context) + list(continuation))[-(self.max_length + 1):]
            by_context[tuple(window[:-len(continuation)])].append(i)
            continuations.append(list(continuation))
        # Longest first, as `hf` orders its requests: the first batch is the largest.
        contexts = sorted(by_context, key=lambda c: (-(len(c) + max(len(continuations[i]) for i in by_context[c])), c))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="loglikelihood", unit="req",
                  disable=disable_tqdm or not self._progress) as bar:
            for start in range(0, len(contexts), self.batch_size):
                group = contexts[start:start + self.batch_size]
                members = [(c, i) for c, ctx in enumerate(group) for i in by_context[ctx]]
                scores = self._score(group, [(c, continuations[i]) for c, i in members])
                for (c, i), score in zip(members, scores):
                    results[i] = score
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
                bar.update(len(members))
        return results

    def _score(self, contexts: list[tuple[int, ...]], rows: list[tuple[int, list[int]]]) -> list[tuple[float, bool]]:
        """Contexts (run once each) and (context index, continuation) rows -> (log-prob, greedy)."""
        lengths = [len(c) for c in contexts]
        longest_fed = max(len(cont) - 1 for _, cont in rows)
        fed_len = bucket(longest_fed, self.max_length, MIN_CONTINUATION_BUCKET) if longest_fed else 0
        # One cache for contexts and continuations: continuation tokens land after their context.
        # Capped at the context + 1 (a rolling window: 1 prefix token, max_length fed), not
        # doubled past it: a cache twice the window would double attention's work and memory.
        cache_len = cache_bucket(max(lengths) + fed_len, self.max_length + 1)
        width = min(prompt_bucket(max(lengths), self.max_length), cache_len)
        ctx_batch = bucket(len(contexts), self.batch_size)
        ids = np.zeros((ctx_batch, width), np.int32)
        for c, context in enumerate(contexts):
            ids[c, :len(context)] = context
        ctx_lengths = np.asarray(lengths + [1] * (ctx_batch - len(contexts)), np.int32)
        first, cache = _run_contexts(self.model.params, jnp.asarray(ids), jnp.asarray(ctx_lengths),
                                     init_cache(self.model.config, ctx_batch, cache_len), model=self._llama)
        first = np.asarray(first)  # [C, V]: small next to the forward that made it
        scores = [(float(first[c, cont[0]]), bool(first[c].argmax() == cont[0])) for c, cont in rows]
        longer = [r for r, (_, cont) in enumerate(rows) if len(cont) > 1]
        if not longer:
            return scores
        row_batch = bucket(len(longer), 2 * len(longer))  # a power of two: few compiled shapes
        fed = np.zeros((row_batch, fed_len), np.int32)
        targets = np.zeros((row_batch, fed_len), np.int32)
        valid = np.zeros((row_batch, fed_len), bool)
        context_of = np.zeros(row_batch, np.int32)
        starts = np.zeros(row_batch, np.int32)
        for k, r in enumerate(longer):
            c, cont = rows[r]
            n = len(cont) - 1
            fed[k, :n], targets[k, :n], valid[k, :n] = cont[:-1], cont[1:], True
            context_of[k], starts[k] = c, lengths[c]
        total, greedy = _score_continuations(self.model.params, cache, jnp.asarray(context_of), jnp.asarray(fed),
                                             jnp.asarray(starts), jnp.asarray(targets), jnp.asarray(valid),
                                             model=self._llama)
        total, greedy = np.asarray(total), np.asarray(greedy)
        for k, r in enumerate(longer):
            logp, first_greedy = scores[r]
            scores[r] = (logp + float(total[k]), first_greedy and bool(greedy[k]))
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood in lm-eval's disjoint rolling windows of the full
        context (the `hf` backend's windows, so the same tokens are scored with the same context)."""
        windows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[r] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------------

    def _row(self, context: str, gen_kwargs: dict) -> tuple[Row, list[str]]:
        """A decode row for one request, and its stop strings (EOS's text included, as in `hf`)."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None),
                                      eos=self.tok_decode([self.eot_token_id], skip_special_tokens=False))
        max_gen = kwargs.pop("max_gen_toks")
        if max_gen >= self.max_length:
            raise ValueError(f"max_gen_toks ({max_gen}) must be less than the model's context ({self.max_length})")
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0.0)) > 0
        sampling = SamplingConfig(max_new_tokens=max_gen, temperature=float(kwargs["temperature"]) if sample else 0.0,
                                  top_k=int(kwargs.get("top_k") or 0) if sample else 0,
                                  top_p=float(kwargs.get("top_p") or 1.0) if sample else 1.0,
                                  seed=int(kwargs.get("seed") or 0), stop=tuple(s for s in until if s))
        # The context leaves room for every token asked for: `hf` truncates it on the left so.
        return Row(self.tok_encode(context, left_truncate_len=self.max_length - max_gen), sampling), until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        rows, stops = zip(*(self._row(*req.args) for req in requests)) if requests else ((), ())
        results: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", unit="req",
                  disable=disable_tqdm or not self._progress) as bar:
            for i, completion in stream_rows(self.model, list(rows), self.batch_size):
                results[i] = postprocess_generated_text(completion.text, stops[i], None)
                self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                bar.update(1)
        return results
