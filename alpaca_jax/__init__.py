"""alpaca-jax: Stanford Alpaca instruction tuning of LLaMA in JAX/Flax.

Importing the package is cheap (no JAX import) so that `data_gen` and the CLI's `--help`
start fast; the public API lives in the subpackages:

- `alpaca_jax.config`    the run config (frozen dataclasses, YAML + overrides)
- `alpaca_jax.model`     the Flax LLaMA and its size presets
- `alpaca_jax.data`      Alpaca templates, tokenization with response-only loss, packing
- `alpaca_jax.train`     train state, the pure train step, optimizer, the training loop
"""

__version__ = "0.1.0"
