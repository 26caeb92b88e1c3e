"""HF `config.json` (LlamaConfig) <-> our `ModelConfig`.

transformers >= 5 writes rotary settings as `rope_parameters: {rope_type, rope_theta, ...}`;
4.x wrote `rope_theta` and `rope_scaling`. We read either, and write both (they agree), so an
export loads in either generation. Only the LLaMA architecture is accepted: anything in the
config that would change the computation and that our model lacks (biases, another activation,
another rope type) is an error naming the field, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from alpaca_jax.config import ModelConfig, RopeScalingConfig
from alpaca_jax.files import read_utf8
from alpaca_jax.hf.errors import ConversionError

ARCHITECTURE = "LlamaForCausalLM"
HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

# Fields of ModelConfig that fix the parameter shapes or the function computed: an `init_from`
# directory must agree on all of them.
MATCHED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "resolved_head_dim", "tie_embeddings", "rope_theta",
                  "rope_scaling", "rms_norm_eps")


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(read_utf8(path, ConversionError))
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def _rope(hf: dict[str, Any], source: str) -> tuple[float, RopeScalingConfig | None]:
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ConversionError(f"{source}: rope_type '{rope_type}' is not supported (only default "
                              f"and llama3)")
    fields = {f.name: params[f.name] for f in dataclasses.fields(RopeScalingConfig) if f.name in params}
    return float(theta), RopeScalingConfig(**fields)


def model_config_from_hf(hf: dict[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
    """The ModelConfig of a HF LLaMA config; `overrides` set the fields HF does not fix
    (param_dtype, dtype, scan_layers, ...)."""
    architectures = hf.get("architectures") or [ARCHITECTURE]
    if hf.get("model_type") != "llama" or ARCHITECTURE not in architectures:
        raise ConversionError(f"{source}: model_type '{hf.get('model_type')}' / architectures "
                              f"{architectures} is not a LLaMA ({ARCHITECTURE})")
    for field, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(field, expected) != expected:
            raise ConversionError(f"{source}: {field}={hf[field]!r} is not supported (ours: {expected!r})")
    try:
        theta, scaling = _rope(hf, source)
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        fields = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim if head_dim and head_dim != hf["hidden_size"] // heads else None,
            rope_theta=theta, rope_scaling=scaling, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=hf.get("initializer_range", 0.02))
    except KeyError as e:
        raise ConversionError(f"{source}: required field {e.args[0]!r} is missing") from None
    return ModelConfig(**{**fields, **overrides})


def hf_dtype(hf: dict[str, Any]) -> str | None:
    """The dtype a HF config says its weights are stored in (`dtype`, or the 4.x `torch_dtype`)."""
    return HF_DTYPES.get(hf.get("dtype") or hf.get("torch_dtype") or "")


def hf_config_from_model(cfg: ModelConfig, dtype: str, bos_token_id: int | None,
                         eos_token_id: int | None, pad_token_id: int | None) -> dict[str, Any]:
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope_scaling = None
    if cfg.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
        rope_parameters = {**rope_scaling, "rope_theta": cfg.rope_theta}
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope_parameters,            # what transformers >= 5 reads
        "rope_theta": cfg.rope_theta,                  # what 4.x reads ...
        "rope_scaling": rope_scaling,                  # ... (null = plain rotary)
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype,                                # transformers >= 5
        "torch_dtype": dtype,                          # 4.x
        "use_cache": True,
    }


def check_matches(cfg: ModelConfig, hf_cfg: ModelConfig, source: str) -> None:
    """Error naming the first field where the run's model and a HF directory disagree."""
    for field in MATCHED_FIELDS:
        ours, theirs = getattr(cfg, field), getattr(hf_cfg, field)
        if ours != theirs:
            name = "head_dim" if field == "resolved_head_dim" else field
            raise ConversionError(f"model.{name}={ours!r} but {source} has {theirs!r}; set "
                                  f"model.{name} to match the weights")
