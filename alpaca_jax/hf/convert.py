"""Streaming conversion between our checkpoints and Hugging Face LLaMA directories.

- `export_hf(run dir | checkpoint | import-hf output, OUT)`: config.json, safetensors (sharded
  with an index above `max_shard_size`), generation_config.json and the tokenizer files, loadable
  by `AutoModelForCausalLM`/`AutoTokenizer` with no extra code.
- `import_hf(HF_DIR, OUT)`: an Orbax params checkpoint + config.yaml (+ tokenizer) that
  `model.init_from` and `export_hf` read.
- `load_hf_params(HF_DIR, model_cfg, shardings)`: weights for `model.init_from`, placed on the mesh.

Both directions go tensor by tensor (see tensor_files.py), so the peak memory is one copy of the
weights plus one tensor. Nothing here downloads: every path is a local directory.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax import sharding
from alpaca_jax.checkpoint import (CheckpointError, SavedParams, abstract_like, find_params, restore_params,
                                   save_params)
from alpaca_jax.config import Config, MeshConfig, ModelConfig, TokenizerConfig, save_config
from alpaca_jax.data.tokenizer import TOKENIZER_FILES, find_tokenizer_dir
from alpaca_jax.hf.config_json import (check_matches, hf_config_from_model, hf_dtype,
                                       model_config_from_hf, read_hf_config)
from alpaca_jax.hf.errors import ConversionError
from alpaca_jax.hf.keymap import (IGNORED_HF_SUFFIXES, LM_HEAD, Placement, from_hf, get_path,
                                  hf_shape, leaf_paths, placements, to_hf)
from alpaca_jax.hf.peft import adapter_placements
from alpaca_jax.hf.tensor_files import (INDEX_FILE, SafetensorsReader, SAFETENSORS_DTYPES,
                                        TensorEntry, write_sharded)
from alpaca_jax.hf.tokenizer_export import export_tokenizer
from alpaca_jax.model.lora_base import base_shardings, prepare_base
from alpaca_jax.model.params import init_params, logical_axes, param_shapes
from alpaca_jax.model.quantize import QuantizedArray, materialize
from alpaca_jax.preflight import check_export_hf, check_import_hf

log = logging.getLogger("alpaca_jax")

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3  # bytes per safetensors file, as transformers 4.x did
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                "bfloat16": SAFETENSORS_DTYPES["BF16"]}


# -- export ---------------------------------------------------------------------------------

def export_hf(source: str | Path, out_dir: str | Path, *, dtype: str | None = None,
              max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, merge: bool = False) -> Path:
    """Write a HF LLaMA directory from a run dir, a checkpoint step dir or an import-hf output.

    `dtype` (float32, bfloat16, float16) defaults to the run's `model.param_dtype`. A LoRA run
    exports its frozen base as the run saw it (a quantized base dequantized: PEFT adapters
    apply on top of it exactly), or with `merge` the base with the adapters folded in.
    """
    saved = find_params(source)
    cfg = saved.config.model
    dtype = dtype or cfg.param_dtype
    if dtype not in NUMPY_DTYPES:
        raise ConversionError(f"export dtype must be one of {sorted(NUMPY_DTYPES)}, got {dtype!r}")
    check_export_hf(source, out_dir)
    if saved.config.lora is not None:
        params = lora_run_params(saved, merge)
        if not merge:
            log.warning("export: %s is a LoRA run; writing its frozen base only (--merge folds the "
                        "adapters in; export-peft writes them for peft)", saved.run_dir)
    elif merge:
        raise ConversionError(f"--merge: {saved.run_dir} is not a LoRA run (no lora section in its "
                              f"config.yaml); export it without --merge")
    else:
        params = restore_params(saved.params_dir)  # host numpy arrays, one copy
    entries = hf_tensor_entries(params, cfg, NUMPY_DTYPES[dtype], str(saved.params_dir))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / INDEX_FILE]:
        stale.unlink(missing_ok=True)  # a previous export with other shards would shadow ours
    files = write_sharded(out_dir, entries, max_shard_size)
    del params

    tokenizer_dir = find_tokenizer_dir(saved.run_dir / "tokenizer", saved.config.tokenizer.path)
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer_dir is not None:
        ids = export_tokenizer(tokenizer_dir, out_dir, TOKENIZER_FILES, saved.config)
    else:
        log.warning("export: no tokenizer found (no %s/tokenizer, no tokenizer.path); "
                    "the export has weights only", saved.run_dir)
    hf_config = hf_config_from_model(cfg, dtype, **ids)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    generation = generation_config(cfg, ids)
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    log.info("exported %s%s to %s (%d safetensors file%s, %s)", saved.run_dir,
             f" (step {saved.step})" if saved.step is not None else "", out_dir, len(files),
             "s" if len(files) > 1 else "", dtype)
    return out_dir


def hf_tensor_entries(params, cfg: ModelConfig, dtype: np.dtype, where: str) -> list[TensorEntry]:
    """Every HF tensor of `params` (ours, host arrays), each made in `dtype` only when read."""
    mapped = {p.path for p in placements(cfg)}
    for path in leaf_paths(params):
        if path not in mapped:
            raise ConversionError(f"{where}: parameter {'/'.join(path)} has no Hugging Face name "
                                  f"(add it to alpaca_jax/hf/keymap.py)")
    entries = []
    for p in placements(cfg):
        try:
            leaf = get_path(params, p.path)
        except KeyError:
            raise ConversionError(f"{where}: parameter {'/'.join(p.path)} (for {p.hf_name}) is "
                                  f"missing; does model.scan_layers match the checkpoint?") from None
        one_layer = leaf.shape[1:] if p.layer is not None else leaf.shape
        entries.append(TensorEntry(p.hf_name, dtype, hf_shape(one_layer, p.input_dims),
                                   lambda leaf=leaf, p=p: _to_hf_tensor(leaf, p, dtype)))
    return entries


def _to_hf_tensor(leaf: np.ndarray, p: Placement, dtype: np.dtype) -> np.ndarray:
    one_layer = np.asarray(leaf[p.layer] if p.layer is not None else leaf)
    if one_layer.dtype == dtype:  # a pure layout change: move raw bytes
        return np.ascontiguousarray(to_hf(_raw(one_layer), p.input_dims)).view(dtype)
    return np.ascontiguousarray(to_hf(one_layer, p.input_dims).astype(dtype))


def _raw(x: np.ndarray) -> np.ndarray:
    """The same bytes as unsigned ints: numpy copies and transposes those with its fast loops,
    where bfloat16 (an ml_dtypes user type) goes element by element, several times slower."""
    return x.view(f"u{x.dtype.itemsize}")


def generation_config(cfg: ModelConfig, ids: dict[str, int | None]) -> dict:
    """generation_config.json: stop at EOS, where every training example ended, and never past
    the context the model was trained for. Greedy, as `generate` defaults to; a server's request
    parameters (temperature, max_tokens) override these."""
    special = {k: v for k, v in ids.items() if v is not None}
    if "eos_token_id" in special and "pad_token_id" not in special:
        special["pad_token_id"] = special["eos_token_id"]  # as training pads (data/tokenizer.py)
    return {**special, "do_sample": False, "max_length": cfg.max_position_embeddings}


def _copy_tokenizer(source: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and (source / name).resolve() != (out_dir / name).resolve():
            shutil.copyfile(source / name, out_dir / name)


# -- import ---------------------------------------------------------------------------------

def load_hf_params(hf_dir: str | Path, model_cfg: ModelConfig, shardings=None):
    """Our params from a HF LLaMA directory (one safetensors file or shards + index).

    The HF config must agree with `model_cfg` on every shape field (else an error naming it);
    tensors are cast to `model_cfg.param_dtype`. With `shardings` (a params-shaped tree of
    `NamedSharding`s) each leaf goes straight onto the mesh, else onto the default device.
    """
    hf_dir = Path(hf_dir)
    source = str(hf_dir / "config.json")
    check_matches(model_cfg, model_config_from_hf(read_hf_config(hf_dir), source), source)
    reader = SafetensorsReader(hf_dir)
    targets = param_shapes(model_cfg)
    by_leaf: dict[tuple[str, ...], list[Placement]] = defaultdict(list)
    for p in placements(model_cfg):
        by_leaf[p.path].append(p)

    expected = {p.hf_name for group in by_leaf.values() for p in group}
    unexpected = [n for n in reader.names() if n not in expected and not n.endswith(IGNORED_HF_SUFFIXES)
                  and not (model_cfg.tie_embeddings and n == LM_HEAD.hf)]
    if unexpected:
        raise ConversionError(f"{hf_dir}: unexpected tensor '{unexpected[0]}'"
                              f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}"
                              f" in a model with config {source}")
    for name in sorted(expected - set(reader.names())):
        raise ConversionError(f"{hf_dir}: tensor '{name}' is missing")

    params: dict = {}
    for path, group in by_leaf.items():
        target = get_path(targets, path)
        array = np.empty(target.shape, target.dtype)
        for p in group:
            one_layer = target.shape[1:] if p.layer is not None else target.shape
            want = hf_shape(one_layer, p.input_dims)
            if reader.shape(p.hf_name) != want:
                raise ConversionError(f"{hf_dir}: tensor '{p.hf_name}' has shape "
                                      f"{list(reader.shape(p.hf_name))}, expected {list(want)}")
            value = reader.get(p.hf_name)
            destination = array if p.layer is None else array[p.layer]
            if value.dtype == array.dtype:  # a pure layout change: move raw bytes
                _raw(destination)[...] = from_hf(_raw(value), p.input_dims, one_layer)
            else:
                destination[...] = from_hf(value, p.input_dims, one_layer)
            del value, destination
        if shardings is not None:
            sharding = get_path(shardings, path)
            array = jax.make_array_from_callback(array.shape, sharding, lambda index, a=array: a[index])
        else:
            array = jax.device_put(array)  # what Orbax saves fastest; the numpy copy goes now
        _set_path(params, path, array)
        del array
    return params


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def import_hf(hf_dir: str | Path, out_dir: str | Path, *, param_dtype: str | None = None,
              scan_layers: bool = True) -> Path:
    """Convert a HF LLaMA directory into `out_dir/{params/, config.yaml, tokenizer/}`.

    `param_dtype` defaults to the dtype the HF config declares (so HF -> ours -> HF is exact).
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_import_hf(hf_dir, out_dir)
    hf = read_hf_config(hf_dir)
    dtype = param_dtype or hf_dtype(hf) or "float32"
    model_cfg = model_config_from_hf(hf, str(hf_dir / "config.json"), param_dtype=dtype,
                                     scan_layers=scan_layers)
    params = load_hf_params(hf_dir, model_cfg)
    save_params(out_dir, params)
    del params
    tokenizer = TokenizerConfig()
    if pretrained_tokenizer_dir(hf_dir) is not None:
        _copy_tokenizer(hf_dir, out_dir / "tokenizer")
        tokenizer = TokenizerConfig(path=str((out_dir / "tokenizer").absolute()))
    save_config(Config(model=model_cfg, tokenizer=tokenizer), out_dir / "config.yaml")
    log.info("imported %s (%s) to %s", hf_dir, dtype, out_dir)
    return out_dir


# -- model.init_from ------------------------------------------------------------------------

def pretrained_tokenizer_dir(path: str | Path) -> Path | None:
    """The tokenizer shipped with pretrained weights: a HF dir's own files, or `<dir>/tokenizer`."""
    return find_tokenizer_dir(Path(path), Path(path) / "tokenizer")


def load_pretrained(path: str | Path, model_cfg: ModelConfig, shardings):
    """Params for `model.init_from`: a HF directory, an import-hf output, or one of our runs."""
    path = Path(path)
    if (path / "config.json").is_file():
        return load_hf_params(path, model_cfg, shardings)
    try:
        saved = find_params(path)
    except CheckpointError as e:
        raise ConversionError(f"model.init_from: {e} (nor a HF directory: no config.json)") from None
    source = str(saved.run_dir / "config.yaml")
    check_matches(model_cfg, saved.config.model, source)
    if saved.config.model.scan_layers != model_cfg.scan_layers:
        raise ConversionError(f"model.scan_layers={model_cfg.scan_layers} but {source} has "
                              f"{saved.config.model.scan_layers}; the parameter layouts differ")
    return restore_params(saved.params_dir, abstract_like(param_shapes(model_cfg), shardings))


def frozen_base(cfg: Config, shardings):
    """The frozen base on the mesh: `model.init_from` weights, or the random init of
    `train.seed` (the very parameters a full fine-tuning run with that seed starts from)."""
    prepare = lambda p: prepare_base(p, cfg.model, cfg.lora)
    if cfg.model.init_from is None:
        return jax.jit(lambda key: prepare(init_params(cfg.model, key)), out_shardings=shardings)(
            jax.random.key(cfg.train.seed))
    mesh = jax.tree.leaves(shardings)[0].mesh
    full = sharding.tree_shardings(logical_axes(cfg.model), param_shapes(cfg.model), mesh, cfg.mesh.rules)
    return jax.jit(prepare, out_shardings=shardings, donate_argnums=0)(
        load_pretrained(cfg.model.init_from, cfg.model, full))


# -- a LoRA run's weights, for export ----------------------------------------------------------

def lora_run_params(saved: SavedParams, merge: bool):
    """Host fp32 params of a LoRA run's model: its frozen base as the run saw it (quantized
    weights dequantized), plus scale * A B on every adapted weight when `merge`."""
    cfg = saved.config
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    base = frozen_base(cfg, base_shardings(cfg.model, cfg.lora, mesh, cfg.mesh.rules))
    params = jax.tree.map(lambda w: np.array(materialize(w, jnp.float32)), base,
                          is_leaf=lambda x: isinstance(x, QuantizedArray))
    del base
    if not merge:
        return params
    adapters = restore_params(saved.params_dir)
    for _, p, path_a, path_b in adapter_placements(cfg.model, cfg.lora):
        a = np.asarray(get_path(adapters, path_a), np.float32)
        b = np.asarray(get_path(adapters, path_b), np.float32)
        weight = get_path(params, p.path)
        if p.layer is not None:
            a, b, weight = a[p.layer], b[p.layer], weight[p.layer]   # weight: a view, updated in place
        fan_in = math.prod(weight.shape[:p.input_dims])
        weight += (cfg.lora.scale * (a.reshape(fan_in, -1) @ b.reshape(cfg.lora.rank, -1))).reshape(weight.shape)
    return params
