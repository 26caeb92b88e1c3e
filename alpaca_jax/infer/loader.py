"""Loading a model to decode with: weights, config and tokenizer from any of our formats.

`load_model` accepts a run directory (its latest checkpoint), a checkpoint directory
(`RUN/checkpoints/STEP`), an `import-hf` output, or a local Hugging Face LLaMA directory. The
weights are placed by the same logical-axis rules as in training, on `mesh` when one is given.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from alpaca_jax import sharding
from alpaca_jax.checkpoint import CheckpointError, abstract_like, find_params, restore_params
from alpaca_jax.config import MeshConfig, ModelConfig
from alpaca_jax.data.chat import chat_template
from alpaca_jax.data.prompt import encode_prompt, encode_text
from alpaca_jax.data.tokenizer import find_tokenizer_dir, load_tokenizer
from alpaca_jax.hf import load_hf_params, model_config_from_hf, read_hf_config
from alpaca_jax.hf.config_json import hf_dtype
from alpaca_jax.model import logical_axes, param_shapes, unscan_layers


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """Everything decoding needs; build it with `load_model`."""
    config: ModelConfig     # the model's shape (remat off, layers unscanned: see load_model)
    params: Any             # parameter pytree, placed on the mesh
    tokenizer: Any          # a Hugging Face tokenizer
    add_bos: bool           # prepend BOS to every prompt (as in training)
    name: str               # a short name: the run or model directory's name
    max_len: int            # context limit in tokens (prompt + generated)
    template: str = "alpaca"  # the chat template the model was trained with (data.template)
    mesh: Any = None        # the jax Mesh the params live on (None: the default device)
    rules: Any = None       # the logical-axis rules the params were placed by (None: MeshConfig's)

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def encode(self, prompt: str) -> list[int]:
        """Ids of an already formatted prompt, BOS as in training (data/prompt.py: encode_text)."""
        return encode_text(prompt, self.tokenizer, self.add_bos)

    def encode_messages(self, messages) -> list[int]:
        """The ids training saw before the answer to `messages` ({role, content[, input]}),
        rendered with this model's chat template and checked against its context."""
        return encode_prompt(messages, self.template, self.tokenizer, self.add_bos, self.max_len)

    @property
    def attention_layout(self):
        """Where a fused attention kernel runs: per device over the params' mesh, or whole on the
        one default device. (Without it, a process that sees 8 GPUs but decodes on one would
        take the "no mesh layout" fallback to xla attention.)"""
        mesh = self.mesh if self.mesh is not None else sharding.single_device_mesh()
        return sharding.attention_layout(mesh, self.rules if self.rules is not None else MeshConfig().rules)

    @property
    def multi_turn(self) -> bool:
        """Whether the model was trained on conversations of several exchanges."""
        return chat_template(self.template, self.tokenizer).multi_turn


def _tokenizer_dir(*candidates) -> Path:
    found = find_tokenizer_dir(*candidates)
    if found is None:
        raise CheckpointError(f"no tokenizer found (looked in {', '.join(str(c) for c in candidates if c)})")
    return found


def _shardings(cfg: ModelConfig, mesh, rules):
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, param_shapes(cfg))
    return sharding.tree_shardings(logical_axes(cfg), param_shapes(cfg), mesh, rules)


def load_model(source: str | Path, mesh=None) -> LoadedModel:
    """Weights, config and tokenizer from a run, checkpoint, import-hf output or HF directory."""
    source = Path(source).expanduser()
    if not source.is_dir():
        raise CheckpointError(f"model directory not found: {source}")
    if (source / "config.json").is_file():  # a Hugging Face LLaMA directory
        hf = read_hf_config(source)
        dtype = hf_dtype(hf) or "float32"  # compute in the dtype the weights were saved in
        cfg = model_config_from_hf(hf, str(source / "config.json"), param_dtype=dtype, dtype=dtype)
        rules = MeshConfig().rules
        params = load_hf_params(source, cfg, None if mesh is None else _shardings(cfg, mesh, rules))
        tokenizer = load_tokenizer(_tokenizer_dir(source))
        add_bos = tokenizer.bos_token_id is not None
        name = source.absolute().name
        template = "alpaca"
    else:
        saved = find_params(source)
        cfg = saved.config.model
        params = restore_params(saved.params_dir,
                                abstract_like(param_shapes(cfg), _shardings(cfg, mesh, saved.config.mesh.rules)))
        tokenizer = load_tokenizer(_tokenizer_dir(saved.run_dir / "tokenizer", saved.config.tokenizer.path))
        add_bos = saved.config.tokenizer.add_bos
        name = saved.run_dir.name
        template = saved.config.data.template
        rules = saved.config.mesh.rules
    if tokenizer.eos_token_id is None:
        raise CheckpointError(f"{source}: the tokenizer has no EOS token, so decoding could never stop")
    cfg = dataclasses.replace(cfg, remat="none")  # same parameter tree; nothing to recompute
    if cfg.scan_layers:
        # Decode with one subtree per layer: a scanned step copies every layer's weights out
        # of the stack on each token (model/params.py: unscan_layers). Same weights, same
        # placement on the other dims; the stacked copy is dropped here.
        params = unscan_layers(params, cfg.num_layers)
        cfg = dataclasses.replace(cfg, scan_layers=False)
    return LoadedModel(config=cfg, params=params, tokenizer=tokenizer, add_bos=add_bos, name=name,
                       template=template, max_len=cfg.max_position_embeddings, mesh=mesh, rules=rules)
