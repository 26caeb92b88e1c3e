"""`export_gguf(RUN, OUT.gguf)`: a run as a llama.cpp model file, or a LoRA run's adapters as a
llama.cpp LoRA file.

RUN is a run directory (its latest checkpoint), one checkpoint, an import-hf output or a local
Hugging Face LLaMA directory. The weights go through the HF export's own tensor list
(hf/convert.py: HF names, HF layout), then llama.cpp's names, q/k row order and encoding
(tensors.py); the tokenizer through vocab.py; the chat template is the one `export-hf` ships
(hf/tokenizer_export.py), so `llama-server --jinja` and llama-cpp-python's
`create_chat_completion` prompt as training did.

A LoRA run (`--lora`): `merge` (default) writes the base with the adapters folded in, `base` the
frozen base as the run saw it (dequantized if QLoRA), `adapter` the adapters alone as a GGUF
LoRA file (`general.type=adapter`, `adapter.lora.alpha`; tensors `<weight>.lora_a` [r, in] and
`<weight>.lora_b` [out, r]) that llama.cpp applies on top of that base (`--lora`).

Streaming: every tensor's name, shape and encoding go into the header first; then each is
computed, encoded and written in turn, so memory holds the source weights plus one tensor. The
file is written beside OUT and renamed into place when complete: a failed export leaves nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
from tqdm.auto import tqdm

from alpaca_jax.checkpoint import find_params, restore_params
from alpaca_jax.config import ModelConfig
from alpaca_jax.configlib import ConfigError
from alpaca_jax.data.records import DataError
from alpaca_jax.data.tokenizer import find_tokenizer_dir, load_tokenizer
from alpaca_jax.gguf_export.tensors import (ROPE_FREQS, TYPES, GgufType, encode, encoded_nbytes, encoding,
                                            gguf_name, rope_factors, to_llama_cpp_rows)
from alpaca_jax.gguf_export.vocab import GgufVocab, gguf_vocab
from alpaca_jax.hf.config_json import model_config_from_hf, read_hf_config
from alpaca_jax.hf.convert import hf_tensor_entries, lora_run_params, pretrained_tokenizer_dir
from alpaca_jax.hf.errors import ConversionError
from alpaca_jax.hf.keymap import placements
from alpaca_jax.hf.peft import hf_adapters, lora_run
from alpaca_jax.hf.tensor_files import SafetensorsReader, TensorEntry
from alpaca_jax.hf.tokenizer_export import chat_template
from alpaca_jax.preflight import check_export_gguf

log = logging.getLogger("alpaca_jax")

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
ADAPTER_TYPES = ("f32", "f16", "bf16")  # a LoRA B has rows of r (< 32): no block format fits


@dataclasses.dataclass(frozen=True)
class _Model:
    """What an export reads, whatever the source."""
    config: ModelConfig
    tensors: list[TensorEntry]      # HF names and layout; `produce()` computes one on demand
    tokenizer: Any                  # the HF tokenizer the model was trained with
    add_bos: bool                   # the training examples began with BOS
    chat_template: str | None
    name: str
    where: str                      # for messages


@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    get: Callable[[], np.ndarray]   # float32, llama.cpp's layout


def export_gguf(source: str | Path, out: str | Path, *, type: str = "f16", lora: str = "merge") -> Path:
    """Write RUN as the GGUF file `out` (see the module docstring); returns `out`."""
    check_export_gguf(source, out, type, lora)
    gtype = TYPES[type]
    out = Path(out)
    if lora == "adapter":
        return _export_adapter(source, out, gtype)
    model = _read_model(Path(source), lora)
    tensors = _model_tensors(model, gtype)
    vocab = gguf_vocab(model.tokenizer, model.config.vocab_size, model.where)

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(model.name)
        writer.add_file_type(gtype.file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hyperparameters(writer, model.config)
        _add_vocab(writer, vocab, model.add_bos, model.chat_template)
    _write(out, metadata, tensors)
    log.info("exported %s to %s (%s, %d tensors, %s)", model.where, out, type, len(tensors),
             _size(out.stat().st_size))
    return out


# -- sources -----------------------------------------------------------------------------------

def _read_model(source: Path, lora: str) -> _Model:
    if (source / "config.json").is_file():
        return _read_hf_dir(source, lora)
    saved = find_params(source)
    cfg, config = saved.config.model, saved.config
    where = str(saved.run_dir) + (f" (step {saved.step})" if saved.step is not None else "")
    if config.lora is not None:
        params = lora_run_params(saved, merge=lora == "merge")
    elif lora != "merge":
        raise ConversionError(f"--lora {lora}: {saved.run_dir} is not a LoRA run (no lora section in its config.yaml)")
    else:
        params = restore_params(saved.params_dir)
    tokenizer_dir = find_tokenizer_dir(saved.run_dir / "tokenizer", config.tokenizer.path)
    if tokenizer_dir is None:
        raise ConversionError(f"{saved.run_dir}: no tokenizer (no tokenizer/ and no tokenizer.path); "
                              f"a GGUF file must carry one")
    tokenizer = _load_tokenizer(tokenizer_dir)
    add_bos = config.tokenizer.add_bos and tokenizer.bos_token_id is not None
    return _Model(config=cfg, tensors=hf_tensor_entries(params, cfg, np.dtype(np.float32), where),
                  tokenizer=tokenizer, add_bos=add_bos,
                  chat_template=chat_template(config, add_bos, getattr(tokenizer, "chat_template", None)),
                  name=saved.run_dir.name, where=where)


def _read_hf_dir(source: Path, lora: str) -> _Model:
    """A local HF LLaMA directory, read as `load_model` reads one (BOS when the tokenizer has
    one; the tokenizer's own chat template)."""
    where = str(source)
    cfg = model_config_from_hf(read_hf_config(source), str(source / "config.json"))
    if lora != "merge":
        raise ConversionError(f"--lora {lora}: {source} is a Hugging Face directory, not a LoRA run")
    reader = SafetensorsReader(source)
    tensors = []
    for p in placements(cfg):
        if p.hf_name not in reader:
            raise ConversionError(f"{source}: tensor '{p.hf_name}' is missing")
        tensors.append(TensorEntry(p.hf_name, np.dtype(np.float32), tuple(reader.shape(p.hf_name)),
                                   lambda name=p.hf_name: reader.get(name).astype(np.float32)))
    tokenizer_dir = pretrained_tokenizer_dir(source)
    if tokenizer_dir is None:
        raise ConversionError(f"{source}: no tokenizer.json or tokenizer.model; a GGUF file must carry a tokenizer")
    tokenizer = _load_tokenizer(tokenizer_dir)
    return _Model(config=cfg, tensors=tensors, tokenizer=tokenizer, add_bos=tokenizer.bos_token_id is not None,
                  chat_template=getattr(tokenizer, "chat_template", None), name=source.absolute().name, where=where)


def _load_tokenizer(directory: Path):
    try:
        return load_tokenizer(directory)
    except DataError as e:
        raise ConversionError(str(e)) from None


# -- tensors -----------------------------------------------------------------------------------

def _model_tensors(model: _Model, gtype: GgufType) -> list[_Tensor]:
    cfg = model.config
    tensors = []
    for entry in model.tensors:
        name = gguf_name(entry.name, cfg.num_layers)
        get = lambda entry=entry: to_llama_cpp_rows(entry.name, entry.produce(), cfg)
        tensors.append(_Tensor(name, tuple(entry.shape), encoding(tuple(entry.shape), gtype.matrices, name), get))
    factors = rope_factors(cfg)
    if factors is not None:
        tensors.append(_Tensor(ROPE_FREQS, factors.shape, gguf.GGMLQuantizationType.F32, lambda: factors))
    return tensors


def _adapter_tensors(saved, gtype: GgufType) -> list[_Tensor]:
    """`<weight>.lora_a` = A [r, in] and `<weight>.lora_b` = B [out, r], B's rows in llama.cpp's
    order (they are the weight's output rows, which tensors.py reorders for q and k)."""
    cfg = saved.config.model
    tensors = []
    for module, a, b in hf_adapters(saved):
        weight = gguf_name(module + ".weight", cfg.num_layers)
        b = to_llama_cpp_rows(module + ".weight", b, cfg)
        for suffix, array in (("lora_a", a), ("lora_b", b)):
            tensors.append(_Tensor(f"{weight}.{suffix}", array.shape, gtype.matrices,
                                   lambda array=array: np.asarray(array, np.float32)))
    return tensors


def _export_adapter(source, out: Path, gtype: GgufType) -> Path:
    if gtype.name not in ADAPTER_TYPES:
        raise ConfigError(f"--type {gtype.name}: adapters are written as {', '.join(ADAPTER_TYPES)} "
                          f"(a LoRA matrix's rows of rank length do not fill {gtype.name} blocks)")
    saved = lora_run(source)
    tensors = _adapter_tensors(saved, gtype)

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(saved.run_dir.name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(saved.config.lora.alpha))
    _write(out, metadata, tensors)
    log.info("exported the LoRA adapters of %s to %s (%d tensors, rank %d, alpha %g)", saved.run_dir, out,
             len(tensors), saved.config.lora.rank, saved.config.lora.alpha)
    return out


# -- metadata ----------------------------------------------------------------------------------

def _add_hyperparameters(writer: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.resolved_head_dim)
    writer.add_value_length(cfg.resolved_head_dim)
    writer.add_rope_dimension_count(cfg.resolved_head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    # Tied embeddings need no key: a LLaMA file without output.weight reads token_embd for both.


def _add_vocab(writer: gguf.GGUFWriter, vocab: GgufVocab, add_bos: bool, template: str | None) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for name, token_id in vocab.special_ids.items():
        writer.add_uint32(getattr(gguf.Keys.Tokenizer, f"{'PAD' if name == 'pad' else name.upper()}_ID"), token_id)
    writer.add_add_bos_token(add_bos)      # the training examples began with BOS (tokenizer.add_bos)
    writer.add_add_eos_token(False)        # EOS ends a response; a prompt never carries one
    if template is not None:
        writer.add_chat_template(template)


# -- writing -----------------------------------------------------------------------------------

def _write(out: Path, metadata: Callable[[gguf.GGUFWriter], None], tensors: list[_Tensor]) -> None:
    """Header, metadata, tensor index, then each tensor computed and written in turn, into a
    file beside `out` that replaces `out` only once complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(partial, ARCH)
    try:
        metadata(writer)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), encoded_nbytes(t.shape, t.qtype),
                                   raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(encoded_nbytes(t.shape, t.qtype) for t in tensors)
        # disable=None: a bar on a terminal, nothing in logs and pipes
        with tqdm(total=total, desc="export-gguf", unit="B", unit_scale=True, disable=None) as bar:
            for t in tensors:
                data = encode(t.get(), t.qtype)
                if data.nbytes != encoded_nbytes(t.shape, t.qtype):
                    raise AssertionError(f"{t.name}: {data.nbytes} bytes encoded, {encoded_nbytes(t.shape, t.qtype)} planned")
                writer.write_tensor_data(data)
                bar.update(data.nbytes)
                del data
        writer.close()
        os.replace(partial, out)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"
