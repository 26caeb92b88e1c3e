"""alpaca-jax: Stanford Alpaca instruction tuning of LLaMA in JAX/Flax.

Importing the package is cheap (no JAX import) so that `data_gen` and the CLI's `--help`
start fast; the public API lives in the subpackages:

- `alpaca_jax.config`    the run config (frozen dataclasses, YAML + overrides)
- `alpaca_jax.model`     the Flax LLaMA and its size presets
- `alpaca_jax.data`      Alpaca templates, tokenization with response-only loss, packing
- `alpaca_jax.train`     train state, the pure train step, optimizer, the training loop
"""

import os

# transformers, imported for its tokenizers only, says "PyTorch was not found. Models won't be
# available..." on every start where torch is absent: advice for its model classes, which
# alpaca-jax never uses (exports are checked with PyTorch where it is installed).
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
