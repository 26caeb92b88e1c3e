"""The prompt owner (alpaca_jax/data/prompt.py) against literal strings from the original
recipes, and `eval` of a Vicuna-template run prompting in Vicuna's format.

References, typed from the sources, not from our code:
- FastChat `fastchat/conversation.py`: `vicuna_v1.1` = SeparatorStyle.ADD_COLON_TWO, sep " ",
  sep2 "</s>", roles (USER, ASSISTANT), and its system message; `get_prompt` writes
  `system + sep`, then `role + ": " + message + seps[i % 2]` per message, `role + ":"` for the
  open one.
- EasyLM `docs/koala.md` + `EasyLM/serving.py: process_chat`: chat_prepend_text
  "BEGINNING OF CONVERSATION: ", user "USER: " + prompt + " ", lm prefix "GPT:", lm suffix
  "</s>"; the model's reply follows "GPT:" with its own leading space.
"""

from __future__ import annotations

import json

import pytest

from alpaca_jax.data import chat_template, encode_prompt, render_prompt
from alpaca_jax.data.conversations import Conversation, Turn
from alpaca_jax.data.prompt import PromptError
from helpers import TINY_TEXTS, make_tiny_run

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
EXCHANGES = [("What is the capital of France?", "Paris."), ("And of Italy?", "Rome.")]


def _messages(with_last_answer: bool):
    messages = []
    for q, a in EXCHANGES:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages if with_last_answer else messages[:-1]


def test_vicuna_renders_fastchats_literal_strings():
    whole = (VICUNA_SYSTEM + " USER: What is the capital of France? ASSISTANT: Paris.</s>"
             "USER: And of Italy? ASSISTANT: Rome.</s>")
    prompt = (VICUNA_SYSTEM + " USER: What is the capital of France? ASSISTANT: Paris.</s>"
              "USER: And of Italy? ASSISTANT:")
    template = chat_template("vicuna_v1.1")
    turns = tuple(Turn(m["role"], m["content"]) for m in _messages(True))
    assert template.render(Conversation(turns)).text == whole
    assert render_prompt(_messages(False), "vicuna_v1.1") == prompt
    system = [{"role": "system", "content": "Be terse."}, *_messages(False)]
    assert render_prompt(system, "vicuna_v1.1") == "Be terse." + prompt[len(VICUNA_SYSTEM):]


def test_koala_renders_easylms_literal_strings():
    whole = ("BEGINNING OF CONVERSATION: USER: What is the capital of France? GPT: Paris.</s>"
             "USER: And of Italy? GPT: Rome.</s>")
    prompt = ("BEGINNING OF CONVERSATION: USER: What is the capital of France? GPT: Paris.</s>"
              "USER: And of Italy? GPT:")
    turns = tuple(Turn(m["role"], m["content"]) for m in _messages(True))
    assert chat_template("koala").render(Conversation(turns)).text == whole
    assert render_prompt(_messages(False), "koala") == prompt


@pytest.fixture(scope="module")
def tokenizer():
    from alpaca_jax.data.tokenizer import train_bpe_tokenizer
    return train_bpe_tokenizer([*TINY_TEXTS, VICUNA_SYSTEM], 512, 1)


def test_one_rule_for_shape_multi_turn_and_bos(tokenizer):
    with pytest.raises(PromptError, match="single-turn Alpaca"):
        render_prompt(_messages(False), "alpaca")
    with pytest.raises(PromptError, match="alternating"):
        render_prompt([{"role": "assistant", "content": "Hi"}], "vicuna_v1.1")
    with pytest.raises(PromptError, match="role"):
        render_prompt([{"role": "wizard", "content": "Hi"}], "vicuna_v1.1")
    text = VICUNA_SYSTEM + " USER: Hi ASSISTANT:"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    one = [{"role": "user", "content": "Hi"}]
    assert encode_prompt(one, "vicuna_v1.1", tokenizer) == [tokenizer.bos_token_id, *plain]
    assert encode_prompt(one, "vicuna_v1.1", tokenizer, add_bos=False) == plain
    with pytest.raises(PromptError, match="context"):
        encode_prompt(one, "vicuna_v1.1", tokenizer, max_len=len(plain) + 1)


def test_eval_of_a_vicuna_run_prompts_and_scores_in_vicunas_format(tmp_path, monkeypatch):
    """Before: eval always used the Alpaca prompt, for generation and for perplexity."""
    import alpaca_jax.eval.perplexity as perplexity
    import alpaca_jax.infer as infer
    from alpaca_jax.eval import evaluate
    from alpaca_jax.infer import load_model

    run = make_tiny_run(tmp_path / "vicuna-run", template="vicuna_v1.1")
    rows = [{"instruction": "Add 3 and 4.", "input": "", "output": "7"},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = load_model(run).tokenizer
    bos = tokenizer.bos_token_id

    def ids(text: str) -> list[int]:
        return [bos, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    # The user text of a row with an input is `instruction\n\ninput` (data/chat.py, as training).
    users = ["Add 3 and 4.", "Add the numbers.\n\n2 and 3"]
    expected_prompts = [ids(f"{VICUNA_SYSTEM} USER: {u} ASSISTANT:") for u in users]
    expected_examples = [ids(f"{VICUNA_SYSTEM} USER: {u} ASSISTANT: {r['output']}</s>") for u, r in zip(users, rows)]

    seen_prompts, seen_examples = [], []
    real_decode, real_tokenize = infer.decode_rows, perplexity.tokenize_dataset

    def decode_rows(model, rows_, *args, **kw):
        seen_prompts.extend(list(r.prompt_ids) for r in rows_)
        return real_decode(model, rows_, *args, **kw)

    def tokenize_dataset(*args, **kw):
        kept, stats = real_tokenize(*args, **kw)
        seen_examples.extend([int(t) for t in x] for x in kept["input_ids"])
        return kept, stats
    monkeypatch.setattr(infer, "decode_rows", decode_rows)
    monkeypatch.setattr(perplexity, "tokenize_dataset", tokenize_dataset)
    results = evaluate([str(run)], str(data), tmp_path / "out", max_new_tokens=3, progress=False)
    assert seen_prompts == expected_prompts
    assert sorted(seen_examples) == sorted(expected_examples)
    assert results["runs"][0]["perplexity"] > 0
