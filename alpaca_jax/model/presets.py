"""Named LLaMA shapes: the YAML files in `configs/model/`, defined once and looked up by name."""

from __future__ import annotations

from alpaca_jax.config import MODEL_PRESET_DIR, ModelConfig, config_from_dict


def preset_names() -> list[str]:
    return sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml"))


def model_preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of preset `name`, with optional field overrides."""
    return config_from_dict({"model": {"preset": name, **overrides}}).model
