"""Conversations, chat templates and assistant-only loss masks (issue 15), and the tokenization
of the prompt/response seam as one joined text (issue 10), with a SentencePiece-style tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from alpaca_jax.data import (BatchIterator, Conversation, DataError, Turn, alpaca_prompt, chat_template,
                             encode_prompt, load_instruction_dataset,
                             read_conversations, render_prompt, tokenize_conversations, tokenize_dataset,
                             train_bpe_tokenizer)
from alpaca_jax.data.tokenize import loss_mask_from_offsets

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# LLaMA-2's template, as shipped with Llama-2-chat (trimmed of its error checks): a BOS before every
# user turn, stripped contents, ` </s>` closing each assistant turn, system folded into the first turn.
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")
# What each template writes after an assistant turn's content, inside the loss.
END_OF_TURN = {"alpaca": "</s>", "vicuna_v1.1": "</s>", "koala": "</s>", "chatml": "<|im_end|>", "llama2": " </s>"}

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly juggle hot "
         "pancakes near ancient rivers; why? because numbers like 42 and 7 matter").split()


def _conversations(n: int, seed: int = 0) -> list[Conversation]:
    """Synthetic multi-turn conversations (some with a system turn, some with an Alpaca input)."""
    rng = np.random.default_rng(seed)
    say = lambda: " ".join(rng.choice(WORDS, rng.integers(2, 12)))  # noqa: E731
    out = []
    for i in range(n):
        turns = [Turn("system", "You are terse. " + say())] if i % 3 == 0 else []
        for k in range(1 + i % 3):
            turns += [Turn("user", say().capitalize() + "?", say() if (i + k) % 4 == 1 else ""),
                       Turn("assistant", say().capitalize() + ".")]
        out.append(Conversation(tuple(turns), f"synthetic:{i}"))
    return out


def _sentencepiece_like(texts) -> PreTrainedTokenizerFast:
    """LLaMA-1/2 style: a BPE over Metaspace pieces (`▁word`), BOS/EOS specials."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set("".join(texts)) | set("▁"))
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _corpus(conversations) -> list[str]:
    texts = [chat_template("vicuna_v1.1").render(c).text for c in conversations]
    return texts + [alpaca_prompt(c.turns[-2].content, c.turns[-2].input) + c.turns[-1].content
                    for c in conversations]


@pytest.fixture(scope="module")
def tokenizers_():
    convs = _conversations(60, seed=1)
    corpus = _corpus(convs)
    byte_level = train_bpe_tokenizer(corpus, vocab_size=800)
    sentencepiece = _sentencepiece_like(corpus)
    for tok in (byte_level, sentencepiece):
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return {"byte_level": byte_level, "sentencepiece": sentencepiece}


def _template(name: str, tokenizer):
    if name in ("chatml", "llama2"):
        tokenizer.chat_template = CHATML if name == "chatml" else LLAMA2
        return chat_template("tokenizer", tokenizer)
    return chat_template(name, tokenizer)


def _masked_runs(ids: np.ndarray, mask: np.ndarray, tokenizer) -> list[str]:
    """Decoded text of each maximal run of loss tokens."""
    runs, i = [], 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j < len(mask) and mask[j]:
                j += 1
            runs.append(tokenizer.decode(ids[i:j].tolist()))
            i = j
        else:
            i += 1
    return runs


def _assert_runs_are_assistant_turns(runs: list[str], conv: Conversation, template, end_of_turn: str):
    rendered = template.render(conv)
    expected = [a.content + end_of_turn for _, a in conv.exchanges]
    assert len(runs) == len(expected) == len(rendered.loss_spans), (runs, expected)
    for run, want, (start, _) in zip(runs, expected, rendered.loss_spans):
        # A token straddling the seam also holds the prompt's last characters: the separator's
        # space (byte-level `ĠParis`), or more where the tokenizer merged across it (a
        # Metaspace BPE's `▁Response:Quietly`). That is the only text allowed beyond the turn.
        extra = run[:len(run) - len(want)]
        assert run.endswith(want) and rendered.text[:start].rstrip().endswith(extra.strip()), (run, want)


@pytest.mark.parametrize("tokenizer_name", ["byte_level", "sentencepiece"])
@pytest.mark.parametrize("template_name", ["vicuna_v1.1", "koala", "chatml", "llama2", "alpaca"])
def test_loss_mask_decodes_to_exactly_the_assistant_turns(tokenizers_, tokenizer_name, template_name):
    tokenizer = tokenizers_[tokenizer_name]
    template = _template(template_name, tokenizer)
    convs = _conversations(40)
    if template_name == "alpaca":  # single-turn: the first exchange of each
        convs = [c.with_exchanges(0, 1) for c in convs]
    ids, masks, stats = tokenize_conversations(convs, tokenizer, template, max_len=10_000)
    assert stats.kept == len(convs) and stats.truncated == stats.dropped == 0
    assert stats.loss_tokens == sum(int(m.sum()) for m in masks)
    for x, mask, conv in zip(ids, masks, convs):
        assert x[0] == tokenizer.bos_token_id and not mask[0]
        assert (x == tokenizer.bos_token_id).sum() == (1 if template_name != "llama2" else len(conv.exchanges))
        _assert_runs_are_assistant_turns(_masked_runs(x, mask, tokenizer), conv, template,
                                         END_OF_TURN[template_name])
    # ... and the same through the batches, packed and padded: each segment's loss targets
    for packing in (True, False):
        it = BatchIterator(ids, masks, batch_size=4, seq_len=max(len(x) for x in ids), seed=3,
                           num_epochs=1, pad_id=0, packing=packing)
        rows = it.epoch_rows(0)
        seen = 0
        for step, batch in enumerate(it):
            for r in range(batch["input_ids"].shape[0]):
                row = rows[step * 4 + r] if step * 4 + r < len(rows) else []
                for segment, example in enumerate(row, start=1):
                    here = batch["segment_ids"][r] == segment
                    runs = _masked_runs(batch["targets"][r][here], batch["loss_mask"][r][here] > 0, tokenizer)
                    _assert_runs_are_assistant_turns(runs, convs[example], template, END_OF_TURN[template_name])
                    seen += 1
        assert seen == len(convs)


def test_a_token_straddling_the_seam_carries_loss():
    offsets = np.array([[0, 3], [3, 7], [7, 9], [9, 9], [9, 12]])
    #                     prompt  straddles  answer  empty  after
    assert loss_mask_from_offsets(offsets, [(5, 9)]).tolist() == [False, True, True, False, False]


def test_joined_text_matches_the_original_recipe_with_a_sentencepiece_tokenizer():
    """Stanford Alpaca tokenized `prompt + output + eos` and masked len(tokenize(prompt)) tokens.
    Tokenizing prompt and response apart gives other ids at the seam with a SentencePiece-style
    tokenizer; ours gives the original's ids and, where the prompt's tokens are a prefix of the
    joined ones, the original's mask. On the bundled seed pool, so it runs in any clone."""
    ds = load_instruction_dataset(["builtin:seed_tasks"])
    tokenizer = _sentencepiece_like([alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in ds])
    kept, stats = tokenize_dataset(ds, tokenizer, max_len=100_000)
    assert stats.kept == len(ds)
    apart_differs = prefix_cases = 0
    for row, example in zip(ds, kept):
        prompt = alpaca_prompt(row["instruction"], row["input"])
        joined = tokenizer(prompt + row["output"] + "</s>", add_special_tokens=False)["input_ids"]
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        apart = prompt_ids + tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert example["input_ids"].tolist() == [tokenizer.bos_token_id] + joined
        apart_differs += apart != joined
        if joined[:len(prompt_ids)] == prompt_ids:
            prefix_cases += 1
            original_mask = [False] * (1 + len(prompt_ids)) + [True] * (len(joined) - len(prompt_ids))
            assert example["loss_mask"].tolist() == original_mask
    assert apart_differs == len(ds)  # a word-boundary `▁` on the response, in every example
    # Where a token straddles the seam (20 of the 226 here, e.g. `▁Response:Quietly`), the
    # prompt's own tokens are not a prefix of the joined ones and the original's mask is off by
    # that token; everywhere else ours is the original's mask exactly (checked above).
    assert prefix_cases > 0.8 * len(ds)


def test_alpaca_template_through_the_chat_path_gives_the_alpaca_path_tokens(tmp_path):
    ds = load_instruction_dataset(["builtin:seed_tasks"])  # our own pool: runs in any clone
    no_input = ds.filter(lambda r: r["input"] == "")
    tokenizer = train_bpe_tokenizer([alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in ds], 2048)
    alpaca_path, alpaca_stats = tokenize_dataset(no_input, tokenizer, max_len=256)
    sharegpt = [{"conversations": [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["output"]}]}
                for r in no_input]
    (tmp_path / "chat.json").write_text(json.dumps(sharegpt))
    convs, report = read_conversations(tmp_path / "chat.json")
    assert report.conversations == len(no_input) > 50
    ids, masks, chat_stats = tokenize_conversations(convs, tokenizer, chat_template("alpaca", tokenizer), 256)
    assert chat_stats == alpaca_stats
    for a, x, m in zip(alpaca_path, ids, masks):
        np.testing.assert_array_equal(a["input_ids"], x)
        np.testing.assert_array_equal(a["loss_mask"], m)


@pytest.mark.parametrize("template_name", ["vicuna_v1.1", "koala", "chatml", "llama2", "alpaca"])
def test_render_prompt_is_what_training_saw_before_each_answer(tokenizers_, template_name):
    tokenizer = tokenizers_["byte_level"]
    template = _template(template_name, tokenizer)
    conv = _conversations(3)[2] if template_name != "alpaca" else _conversations(3)[0].with_exchanges(0, 1)
    ids, masks, _ = tokenize_conversations([conv], tokenizer, template, 10_000)
    starts = np.flatnonzero(masks[0][1:] & ~masks[0][:-1]) + 1  # first token of each answer
    body = [t for t in conv.turns if t.role != "system"]
    for k, start in enumerate(starts):
        messages = [{"role": t.role, "content": t.content, "input": t.input}
                    for t in conv.turns[:len(conv.turns) - len(body) + 2 * k + 1]]
        prompt = render_prompt(messages, template)
        assert template.render(conv).text.startswith(prompt)
        assert encode_prompt(messages, template, tokenizer) == ids[0][:start].tolist()
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_prompt(system, "alpaca") == "Be brief.\n\n### Instruction:\nHi\n\n### Response:"
    vicuna = render_prompt([{"role": "user", "content": "Hi"}], "vicuna_v1.1")
    assert vicuna.endswith("questions. USER: Hi ASSISTANT:")
    with pytest.raises(ValueError, match="end with a user turn"):
        render_prompt([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "vicuna_v1.1")


def test_sharegpt_and_openai_layouts_json_and_jsonl_agree(tmp_path, shared_data):
    rows = json.loads((shared_data / "dummy_conversation.json").read_text())
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    openai = [{"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]]}
              for r in rows]
    (tmp_path / "openai.jsonl").write_text("\n".join(json.dumps(r) for r in openai))
    (tmp_path / "mixed.json").write_text(json.dumps(openai[:250] + rows[250:]))
    sharegpt, report = read_conversations(shared_data / "dummy_conversation.json")
    assert len(sharegpt) == report.conversations == 500 and not report.malformed
    assert sum(len(c.exchanges) for c in sharegpt) == 1000
    for path, fmt in ((tmp_path / "openai.jsonl", "openai"), (tmp_path / "mixed.json", "auto")):
        convs, _ = read_conversations(path, fmt)
        assert [c.turns for c in convs] == [c.turns for c in sharegpt]


def _bad_rows():
    good = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    return [
        {"conversations": good},
        {"conversations": [{"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Hi"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  "}]},
        {"conversations": [{"from": "wizard", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"conversations": [{"from": "human", "value": "Hi"}]},
        {"conversations": good + [{"from": "human", "value": "And?"}]},
        {"conversations": [{"from": "system", "value": "Be kind."}, *good]},
    ]


def test_malformed_conversations_are_counted_and_skipped_or_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _bad_rows()) + "\n")
    convs, report = read_conversations(path)
    assert len(convs) == 3 and report.trailing_user_dropped == 1
    assert dict(report.malformed) == {"roles out of order": 1, "empty turn": 1, "unknown role 'wizard'": 1,
                                      "no assistant turn": 1}
    assert convs[1].exchanges == convs[0].exchanges and convs[2].system == "Be kind."
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed conversation: roles out of order"):
        read_conversations(path, on_malformed="error")


def test_cli_refuses_a_malformed_conversation_in_one_line(tmp_path, capsys):
    from alpaca_jax.cli import main
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_bad_rows(), indent=2))
    code = main(["train", f"data.train_files=[{path}]", "data.on_malformed=error", "data.template=vicuna_v1.1",
                 f"run.dir={tmp_path / 'run'}", "train.progress_bar=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    second_row = [i for i, line in enumerate(path.read_text().splitlines(), 1) if line == "  {"][1]
    assert err[0] == f"error: {path}:{second_row}: malformed conversation: roles out of order (data.on_malformed=skip skips and counts these)"


def test_openassistant_trees_flatten_along_the_best_ranked_path(tmp_path):
    def msg(mid, parent, role, text, rank=None, **extra):
        return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank,
                "message_tree_id": "t", **extra}
    rows = [
        msg("a1", "p1", "assistant", "second best", rank=1),
        msg("p1", None, "prompter", "What is 2+2?"),
        msg("a3", "p1", "assistant", "deleted but ranked first", rank=0, deleted=True),
        msg("a2", "p1", "assistant", "Four.", rank=0 + 0.5 * 0),  # rank 0 beats rank 1
        msg("p2", "a2", "prompter", "And 3+3?"),                  # the only follow-up: unranked
        msg("a4", "p2", "assistant", "Six, unranked."),
        msg("a5", "p2", "assistant", "Six, ranked.", rank=0),      # ranked beats unranked
        msg("p3", "a1", "prompter", "Below a worse answer: never taken"),
        msg("a6", "p3", "assistant", "never taken", rank=0),
        # tree 2: its only reply was deleted -> no assistant turn
        msg("q1", None, "prompter", "Hello?"),
        msg("b1", "q1", "assistant", "spam", deleted=True),
        # tree 3: unranked replies -> the first in the file; an unanswered prompter at the end
        msg("r1", None, "prompter", "Name a colour."),
        msg("c1", "r1", "assistant", "Blue."),
        msg("c2", "r1", "assistant", "Red."),
        msg("r2", "c1", "prompter", "Another?"),
        msg("c3", "r1", "assistant", "rejected by review", rank=0, review_result=False),
    ]
    path = tmp_path / "oasst.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    convs, report = read_conversations(path)
    as_pairs = [[(t.role, t.content) for t in c.turns] for c in convs]
    assert as_pairs == [
        [("user", "What is 2+2?"), ("assistant", "Four."), ("user", "And 3+3?"), ("assistant", "Six, ranked.")],
        [("user", "Name a colour."), ("assistant", "Blue.")],
    ]
    assert report.oasst_trees == 3 and report.oasst_messages_skipped == 3
    assert dict(report.malformed) == {"no assistant turn": 1} and report.trailing_user_dropped == 1
    assert convs[0].where == f"{path}:2"


def test_long_conversations_truncate_at_a_turn_boundary_or_split(tokenizers_):
    tokenizer = tokenizers_["byte_level"]
    template = chat_template("vicuna_v1.1", tokenizer)
    convs = [c for c in _conversations(60) if len(c.exchanges) == 3]
    full, full_masks, _ = tokenize_conversations(convs, tokenizer, template, 10_000)
    max_len = int(np.median([len(x) for x in full]))
    ids, masks, stats = tokenize_conversations(convs, tokenizer, template, max_len)
    assert stats.truncated == sum(len(x) > max_len for x in full) > 0 and stats.split == 0
    for x, m, whole, conv in zip(ids, masks, full, convs):
        assert len(x) <= max_len
        np.testing.assert_array_equal(x, whole[:len(x)])
        runs = _masked_runs(x, m, tokenizer)
        if len(x) < len(whole) and x[-1] == tokenizer.eos_token_id:  # cut at a turn boundary
            _assert_runs_are_assistant_turns(runs, conv.with_exchanges(0, len(runs)), template, "</s>")
        elif len(x) < len(whole):  # the first exchange alone is too long: cut inside its answer
            assert len(x) == max_len and len(runs) <= 1
    ids, masks, stats = tokenize_conversations(convs, tokenizer, template, max_len, long="split")
    assert stats.split > 0 and stats.kept > len(convs) and stats.truncated == 0
    assert all(len(x) <= max_len for x in ids)
    answers = [a.content + "</s>" for c in convs for _, a in c.exchanges]
    got = [run.lstrip() for x, m in zip(ids, masks) for run in _masked_runs(x, m, tokenizer)]
    assert sorted(got) == sorted(answers)  # every answer kept, whole, exactly once
    systems = {c.system or chat_template("vicuna_v1.1").render(c).text[:20] for c in convs}
    for x in ids:  # every piece re-rendered with its conversation's system turn
        assert any(tokenizer.decode(x[1:].tolist()).startswith(s) for s in systems)


@pytest.mark.parametrize("name", ["vicuna_v1.1", "koala"])
def test_exported_chat_template_gives_the_training_prompt_ids(tokenizers_, name):
    """What `export-hf` ships for a conversation-trained run: transformers' apply_chat_template
    reproduces `encode_prompt` (and a whole conversation renders as training rendered it)."""
    import copy

    from alpaca_jax.hf.chat_template import role_colon_chat_template
    template = chat_template(name)
    tokenizer = copy.deepcopy(tokenizers_["byte_level"])
    tokenizer.chat_template = role_colon_chat_template(template.system, template.user, template.assistant,
                                                       add_bos=True)
    for conv in _conversations(9):
        conv = Conversation(tuple(Turn(t.role, t.content) for t in conv.turns))  # no Alpaca input at inference
        messages = [{"role": t.role, "content": t.content} for t in conv.turns]
        whole = tokenizer.apply_chat_template(messages, tokenize=False)
        assert whole == "<s>" + template.render(conv).text
        prompt = messages[:-1]
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
        assert list(ids) == encode_prompt(prompt, name, tokenizer)
    with pytest.raises(Exception, match="alternating"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "Hi"}], tokenize=False)
