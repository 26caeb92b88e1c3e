"""Perplexity of a model on an eval file's reference answers.

The same computation as the held-out loss during training (train/evaluate.py): examples
tokenized with the model's own tokenizer and template, response tokens (and EOS) scored,
packed into rows of the model's `max_len`, sum / count over the whole file.
"""

from __future__ import annotations

import functools

import datasets
import jax

from alpaca_jax.data import special_ids, tokenize_dataset
from alpaca_jax.data.records import DataError
from alpaca_jax.eval.dataset import EvalItem
from alpaca_jax.model import Llama
from alpaca_jax.train.evaluate import EvalLoss, eval_batches, eval_step, mean_eval_loss

__all__ = ["reference_loss"]


def reference_loss(model, items: list[EvalItem], batch_size: int = 8) -> tuple[EvalLoss, dict]:
    """(loss over the items' references, tokenize stats); `model` is an infer.LoadedModel."""
    rows = [{"instruction": i.instruction, "input": i.input, "output": i.reference}
            for i in items if i.reference is not None]
    # The run's own template: a Vicuna-trained model is scored on the Vicuna rendering.
    kept, stats = tokenize_dataset(datasets.Dataset.from_list(rows), model.tokenizer, model.max_len,
                                   model.add_bos, template=model.template)
    input_ids = list(kept["input_ids"])
    if not input_ids:
        raise DataError(f"no reference answer has a token within the model's {model.max_len}-token context")
    # Rows as long as the longest example (to a multiple of 64), not the model's whole context:
    # a 2,048-token row for 200-token answers would be mostly padding.
    seq_len = min(model.max_len, -(-max(len(x) for x in input_ids) // 64) * 64)
    batches = eval_batches(input_ids, list(kept["loss_mask"]), batch_size=batch_size,
                           seq_len=seq_len, pad_id=special_ids(model.tokenizer).pad,
                           packing=True, pack_window=64)
    step_fn = _jitted_eval_step(model.config, model.attention_layout)
    place = lambda batch: {k: v[None] for k, v in batch.items()}  # noqa: E731 - [B, T] -> [1, B, T]
    return mean_eval_loss(step_fn, model.params, batches, place, stats.kept), {
        "examples": stats.examples, "scored": stats.kept, "truncated": stats.truncated,
        "dropped": stats.dropped, "max_len": model.max_len}


@functools.lru_cache(maxsize=4)
def _jitted_eval_step(config, layout):
    """One compiled step per model shape, reused across calls (several runs of one ablation)."""
    return jax.jit(functools.partial(eval_step, model=Llama(config, None, layout)))
