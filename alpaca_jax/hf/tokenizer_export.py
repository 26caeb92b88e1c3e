"""The tokenizer an export ships: the run's files, made to encode and prompt as training did.

Training builds every example itself (`[BOS] prompt response [EOS]`, with
`add_special_tokens=False`), so the tokenizer files it saved say nothing about BOS; a trained BPE
even carries a post-processor that adds none. Here the exported copy is fixed so that
`tokenizer(text)` starts with BOS exactly when the run's examples did (`tokenizer.add_bos`), it
carries the chat template of the run's prompt format (chat_template.py), and it loads in every
transformers version `pyproject.toml` allows: transformers 5 names a plain fast tokenizer
`TokenizersBackend`, a class 4.x does not have, so the class is written as
`PreTrainedTokenizerFast`, the name both majors resolve.

Everything is edited as JSON (tokenizer.json through the `tokenizers` library), never re-saved
through transformers, whose output format is the one that 4.x cannot read.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from tokenizers import Tokenizer, processors
from transformers import AutoTokenizer

from alpaca_jax.config import Config
from alpaca_jax.data.chat import chat_template as training_template
from alpaca_jax.data.prompt import encode_prompt
from alpaca_jax.data.tokenizer import load_tokenizer
from alpaca_jax.hf.chat_template import alpaca_chat_template, role_colon_chat_template
from alpaca_jax.hf.errors import ConversionError

log = logging.getLogger("alpaca_jax")

# Chat templates in files of their own override tokenizer_config.json's in transformers 5; the
# source tokenizer's (say a base model's) would shadow the one this run was trained with.
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# The class names transformers 5 writes for a plain `tokenizers` tokenizer; 4.x lacks them.
V5_ONLY_CLASSES = ("TokenizersBackend",)


def export_tokenizer(source: Path, out_dir: Path, files: tuple[str, ...],
                     config: Config) -> dict[str, int | None]:
    """Copy `files` from `source` into `out_dir`, fixed as the module docstring says.

    Returns the special ids (bos/eos/pad, None where absent) for config.json and
    generation_config.json.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in CHAT_TEMPLATE_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for name in files:
        if name not in CHAT_TEMPLATE_FILES and (source / name).is_file() \
                and (source / name).resolve() != (out_dir / name).resolve():
            shutil.copyfile(source / name, out_dir / name)

    trained = load_tokenizer(source)  # as training loaded it: its BOS began the examples
    add_bos = config.tokenizer.add_bos and trained.bos_token_id is not None
    tokenizer_config = _read_json(out_dir / "tokenizer_config.json")
    if (out_dir / "tokenizer.json").is_file():
        _set_bos_post_processor(out_dir / "tokenizer.json", trained.bos_token if add_bos else None)
        if tokenizer_config.get("tokenizer_class") in (None, *V5_ONLY_CLASSES):
            tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config.pop("backend", None)  # a transformers 5 field; 4.x would keep it as an init kwarg
    tokenizer_config["add_bos_token"] = add_bos  # LLaMA tokenizer classes build their post-processor from it
    tokenizer_config["add_eos_token"] = False    # EOS ends a response; the prompt never carries one
    tokenizer_config["model_max_length"] = config.model.max_position_embeddings
    template = chat_template(config, add_bos, getattr(trained, "chat_template", None))
    if template is not None:
        tokenizer_config["chat_template"] = template
    else:
        tokenizer_config.pop("chat_template", None)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    if template is not None and config.data.template != "tokenizer":
        _check_chat_template(out_dir, config.data.template, trained, add_bos)
    return {"bos_token_id": trained.bos_token_id, "eos_token_id": trained.eos_token_id,
            "pad_token_id": trained.pad_token_id}


def chat_template(config: Config, add_bos: bool, source_template: str | None = None) -> str | None:
    """The Jinja chat template for the run's prompt format, or None (with a warning) if it has none."""
    if config.data.template == "alpaca":
        return alpaca_chat_template(add_bos)
    if config.data.template in ("vicuna_v1.1", "koala"):
        template = training_template(config.data.template)
        return role_colon_chat_template(template.system, template.user, template.assistant, add_bos)
    if config.data.template == "tokenizer" and source_template:
        return source_template  # the run's tokenizer's own template, as training rendered it
    log.warning("export: no chat template for data.template=%s; chat servers will refuse "
                "chat requests to this export (completions still work)", config.data.template)
    return None


# Conversations the exported template must render into the prompt owner's ids (data/prompt.py).
_CHECK_CONVERSATIONS = ([{"role": "user", "content": "Name a colour."}],
                        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}],
                        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                         {"role": "user", "content": "More"}])


def _check_chat_template(out_dir: Path, template_name: str, trained, add_bos: bool) -> None:
    """The exported Jinja template, read back by transformers, gives the prompt ids training saw
    (`encode_prompt`), for every conversation shape the run's template accepts."""
    exported = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    template = training_template(template_name, trained)
    for messages in _CHECK_CONVERSATIONS:
        if not template.multi_turn and len(messages) > 2:
            continue
        expected = encode_prompt(messages, template, trained, add_bos)
        got = list(exported.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
        if got != expected:
            raise ConversionError(f"{out_dir}: the exported chat template does not give the prompt ids "
                                  f"training saw for {messages} ({got[:12]}... != {expected[:12]}...)")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def _set_bos_post_processor(path: Path, bos: str | None) -> None:
    """Make `tokenizer(text)` add `bos` (or nothing) in front, as LLaMA's TemplateProcessing does."""
    tokenizer = Tokenizer.from_file(str(path))
    if bos is None:
        template = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    else:
        bos_id = tokenizer.token_to_id(bos)
        if bos_id is None:
            raise ConversionError(f"{path}: the BOS token {bos!r} is not in the vocabulary")
        template = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                 special_tokens=[(bos, bos_id)])
    current = tokenizer.post_processor
    if isinstance(current, processors.ByteLevel):  # keep its offset trimming, add the BOS after it
        template = processors.Sequence([current, template])
    tokenizer.post_processor = template
    tokenizer.save(str(path))
