"""LoRA adapters <-> PEFT's format, and the merged or base weights of a LoRA run.

- `export_peft(run, OUT)`: `adapter_config.json` + `adapter_model.safetensors` that
  `peft.PeftModel.from_pretrained(base, OUT)` loads on top of the run's base (the original HF
  directory, or `export-hf` of the run, which writes the base exactly as the run saw it).
- `load_peft_adapter(DIR, ...)`: a PEFT LoRA directory as our adapters (`lora.init_from`).
- `adapter_placements`: where each adapter sits in PEFT's names (the merged export in
  hf/convert.py: `lora_run_params`, uses it too).

PEFT keeps A as `lora_A.weight` [r, in] and B as `lora_B.weight` [out, r] beside each HF linear
(`base_model.model.<module>.lora_A.weight`), with update (alpha / r) * B A, like ours; the
layout change is the same reshape + transpose as the weights' (keymap.py).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from alpaca_jax.checkpoint import SavedParams, find_params, restore_params
from alpaca_jax.config import LoraConfig, ModelConfig
from alpaca_jax.hf.errors import ConversionError
from alpaca_jax.hf.keymap import get_path, placements
from alpaca_jax.hf.tensor_files import SafetensorsReader, TensorEntry, write_safetensors
from alpaca_jax.model.lora import TARGET_WEIGHTS, adapter_names
from alpaca_jax.model.params import adapter_shapes

log = logging.getLogger("alpaca_jax")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# our target name -> the HF module name PEFT's target_modules uses
HF_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
              "up": "up_proj", "down": "down_proj"}


def adapter_placements(model_cfg: ModelConfig, lora: LoraConfig):
    """(HF module name, the weight's Placement, path to A, path to B) per adapted weight."""
    weight_to_target = {weight: target for target, weight in TARGET_WEIGHTS.items()}
    for p in placements(model_cfg):
        target = weight_to_target.get(p.path[-2:])
        if target is None or target not in lora.target_modules:
            continue
        name_a, name_b = adapter_names(p.path[-1])
        yield p.hf_name.removesuffix(".weight"), p, (*p.path[:-1], name_a), (*p.path[:-1], name_b)


def peft_config(lora: LoraConfig, base_model: str | None) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted(HF_MODULES[t] for t in lora.target_modules),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
        "init_lora_weights": True, "inference_mode": True,
    }


def hf_adapters(saved: SavedParams) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(HF module name, A [r, in], B [out, r]) for every adapted weight of a LoRA run, in HF's
    layout (what PEFT stores, and llama.cpp's LoRA files too)."""
    cfg, lora = saved.config.model, saved.config.lora
    adapters = restore_params(saved.params_dir)
    for module, p, path_a, path_b in adapter_placements(cfg, lora):
        a, b = get_path(adapters, path_a), get_path(adapters, path_b)
        a, b = (np.asarray(a if p.layer is None else a[p.layer]), np.asarray(b if p.layer is None else b[p.layer]))
        fan_in = math.prod(a.shape[:p.input_dims])
        yield (module, np.ascontiguousarray(a.reshape(fan_in, lora.rank).T),   # [r, in]
               np.ascontiguousarray(b.reshape(lora.rank, -1).T))               # [out, r]


def lora_run(source: str | Path) -> SavedParams:
    """The run at `source`, which must be a LoRA run."""
    saved = find_params(source)
    if saved.config.lora is None:
        raise ConversionError(f"{saved.run_dir}: not a LoRA run (its config.yaml has no lora section)")
    return saved


def export_peft(source: str | Path, out_dir: str | Path) -> Path:
    """Write a LoRA run's adapters (latest checkpoint, or the given one) in PEFT's format."""
    saved = lora_run(source)
    lora = saved.config.lora
    entries = []
    for module, a_hf, b_hf in hf_adapters(saved):
        for suffix, array in (("lora_A", a_hf), ("lora_B", b_hf)):
            entries.append(TensorEntry(f"{PEFT_PREFIX}{module}.{suffix}.weight", array.dtype, array.shape,
                                       lambda array=array: array))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_dir / ADAPTER_WEIGHTS, entries)
    base = saved.config.model.init_from
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(peft_config(lora, base), indent=2) + "\n")
    log.info("exported the LoRA adapters of %s%s to %s (%d tensors)", saved.run_dir,
             f" (step {saved.step})" if saved.step is not None else "", out_dir, len(entries))
    return out_dir


def _check_adapter_config(directory: Path, lora: LoraConfig) -> None:
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise ConversionError(f"lora.init_from: {path} does not exist (not a PEFT adapter directory)")
    try:
        peft = json.loads(path.read_text())
    except ValueError:
        raise ConversionError(f"{path}: not valid JSON") from None
    if peft.get("peft_type") != "LORA":
        raise ConversionError(f"{path}: peft_type {peft.get('peft_type')!r} is not LORA")
    for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if peft.get(key):
            raise ConversionError(f"{path}: {key}=true is not supported")
    expected = {"r": lora.rank, "lora_alpha": lora.alpha,
                "target_modules": sorted(HF_MODULES[t] for t in lora.target_modules)}
    ours = {"r": "lora.rank", "lora_alpha": "lora.alpha", "target_modules": "lora.target_modules"}
    for key, want in expected.items():
        have = peft.get(key)
        if key == "target_modules" and isinstance(have, list):
            have = sorted(have)
        if have != want and not (key == "lora_alpha" and isinstance(have, (int, float)) and float(have) == want):
            raise ConversionError(f"{ours[key]}={want} but {path} has {key}={have}")


def load_peft_adapter(directory: str | Path, model_cfg: ModelConfig, lora: LoraConfig, shardings=None):
    """Our adapters from a PEFT LoRA directory; every tensor's shape is checked against the base."""
    directory = Path(directory)
    _check_adapter_config(directory, lora)
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise ConversionError(f"lora.init_from: {directory / ADAPTER_WEIGHTS} does not exist")
    reader = SafetensorsReader(directory)
    targets = adapter_shapes(model_cfg, lora)
    arrays = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), targets)
    expected = set()
    for module, p, path_a, path_b in adapter_placements(model_cfg, lora):
        for suffix, path in (("lora_A", path_a), ("lora_B", path_b)):
            name = f"{PEFT_PREFIX}{module}.{suffix}.weight"
            expected.add(name)
            array = get_path(arrays, path)
            one_layer = array.shape[1:] if p.layer is not None else array.shape
            if suffix == "lora_A":
                want = (lora.rank, math.prod(one_layer[:p.input_dims]))
            else:
                want = (math.prod(one_layer[1:]), lora.rank)
            if name not in reader:
                raise ConversionError(f"{directory}: tensor '{name}' is missing")
            if reader.shape(name) != want:
                raise ConversionError(f"{directory}: tensor '{name}' has shape {list(reader.shape(name))}, "
                                      f"the model needs {list(want)} (an adapter for another base?)")
            value = reader.get(name).astype(array.dtype).T.reshape(one_layer)
            if p.layer is None:
                array[...] = value
            else:
                array[p.layer] = value
    unexpected = sorted(set(reader.names()) - expected)
    if unexpected:
        raise ConversionError(f"{directory}: unexpected tensor '{unexpected[0]}' for lora.target_modules="
                              f"{list(lora.target_modules)} on a {model_cfg.num_layers}-layer model")
    if shardings is None:
        return jax.tree.map(jax.device_put, arrays)
    return jax.tree.map(lambda a, sh: jax.make_array_from_callback(a.shape, sh, lambda i, a=a: a[i]),
                        arrays, shardings)
