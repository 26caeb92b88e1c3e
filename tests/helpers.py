"""Small builders shared by the training-spine tests (tiny shapes only)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from alpaca_jax.config import ModelConfig
from alpaca_jax.data.templates import alpaca_prompt


def tiny_model(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2)
    base.update(overrides)
    return ModelConfig(**base)


def random_examples(rng: np.random.Generator, lengths, vocab: int):
    """Examples of the given token lengths with a prompt/response loss mask."""
    ids, masks = [], []
    for n in lengths:
        ids.append(rng.integers(4, vocab, n).astype(np.int32))
        mask = np.zeros(n, bool)
        mask[rng.integers(1, n - 1):] = True  # a prompt, then the response
        masks.append(mask)
    return ids, masks


# -- a decodable run directory (inference tests) ------------------------------------------------

TINY_TEXTS = ([alpaca_prompt(f"Add {i} and {i + 1}.") for i in range(50)]
              + [f"The sum of {i} and {i + 1} is {2 * i + 1}. Café, naïve, 東京." for i in range(200)])


def random_params(cfg, seed: int = 0):
    """Weights of a clear scale: norms around 1, matrices with std 0.1 (a trained-like spread)."""
    from alpaca_jax.model import param_shapes
    rng = np.random.default_rng(seed)

    def one(path, x):
        is_norm = jax.tree_util.keystr(path).endswith("['scale']")
        return ((1.0 if is_norm else 0.0) + (0.3 if is_norm else 0.1) * rng.standard_normal(x.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(one, param_shapes(cfg))


def make_tiny_run(root: Path, seed: int = 0, template: str = "alpaca", **model_overrides) -> Path:
    """config.yaml + params/ + tokenizer/: what find_params and load_model read. `template` is
    the run's data.template (what a run trained with that chat template records)."""
    from alpaca_jax.checkpoint import save_params
    from alpaca_jax.config import Config, DataConfig, TokenizerConfig, save_config
    from alpaca_jax.data.tokenizer import train_bpe_tokenizer
    cfg = Config(model=tiny_model(**{"vocab_size": 512, "max_position_embeddings": 192, **model_overrides}),
                 tokenizer=TokenizerConfig(add_bos=True), data=DataConfig(template=template))
    root.mkdir(parents=True)
    save_params(root, random_params(cfg.model, seed))
    train_bpe_tokenizer(TINY_TEXTS, 512, 1).save_pretrained(str(root / "tokenizer"))
    save_config(cfg, root / "config.yaml")
    return root


def assert_resumes_exactly(make_iterator, full: list, stop: int) -> None:
    """A batch iterator stopped after `stop` batches and restored from its state into a fresh
    one (a run killed and resumed) yields exactly the rest of the uninterrupted stream `full`."""
    first = make_iterator()
    for _ in range(stop):
        next(first)
    resumed = make_iterator()
    resumed.restore(first.state())
    rest = list(resumed)
    assert len(rest) == len(full) - stop
    for a, b in zip(rest, full[stop:]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
