# SFT data in process (pptk.data.chat, chat_template, packing, sft): the three record formats, answer masks for three
# template styles on a real (demo-trained) tokenizer, packing and padding, truncation, and every bad input's message.
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pptk.data.chat import Conversation, Message, read_conversations, split_eval
from pptk.data.chat_template import (
    ChatTemplate,
    TokenizedConversation,
    mask_method,
    resolve_chat_template,
    tokenize_conversations,
)
from pptk.data.demo import demo_corpus, train_demo_tokenizer
from pptk.data.packing import build_rows, pack_best_fit
from pptk.data.sft import load_sft_data
from pptk.errors import PptkError

IGNORE = -100
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_PLAIN = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
# Llama-2 / Mistral: the system turn folded into the first user turn, alternation enforced, no generation prompt.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{% set content = message['content'] %}{% if loop.index0 == 0 and system %}"
    "{% set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + content %}{% endif %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
TEMPLATES = {"chatml": CHATML, "chatml-plain": CHATML_PLAIN, "llama2": LLAMA2}


def expected_answer(style: str, answer: str) -> str:
    """What each template renders for an answer: the tokens that must be supervised, end-of-turn included."""
    return f"{answer}<|im_end|>\n" if style.startswith("chatml") else f" {answer.strip()} </s>"


RECORDS: dict[str, list[dict[str, Any]]] = {
    "messages": [
        {
            "messages": [
                {"role": "system", "content": "Answer in one sentence."},
                {"role": "user", "content": "What does a list hold?"},
                {"role": "assistant", "content": "Any objects, in order."},
                {"role": "user", "content": "And a dict?"},
                {"role": "assistant", "content": "Keys mapped to values."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Name a sorting function."},
                {"role": "assistant", "content": "sorted() returns a new list."},
            ]
        },
    ],
    "prompt-completion": [
        {"prompt": "Which module reads CSV files?", "completion": "The csv module."},
        {"prompt": "What does zip() return?", "completion": "An iterator of tuples."},
        {
            "prompt": [{"role": "user", "content": "Is a tuple mutable?"}],
            "completion": [{"role": "assistant", "content": "No, it is immutable."}],
        },
    ],
    "alpaca": [
        {"instruction": "Explain what a generator is.", "input": "", "output": "A function that yields values."},
        {"instruction": "Translate to Python.", "input": "add one to x", "output": "x += 1"},
    ],
}
ANSWERS = {
    "messages": [["Any objects, in order.", "Keys mapped to values."], ["sorted() returns a new list."]],
    "prompt-completion": [["The csv module."], ["An iterator of tuples."], ["No, it is immutable."]],
    "alpaca": [["A function that yields values."], ["x += 1"]],
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return train_demo_tokenizer(
        text=demo_corpus()[:300_000], vocab_size=1024, out_dir=tmp_path_factory.mktemp("chat") / "tokenizer"
    )


def make_tokenizer(tokenizer_dir: Path, style: str | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    tokenizer.chat_template = TEMPLATES[style] if style else None
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dir):
    return {style: make_tokenizer(tokenizer_dir, style) for style in TEMPLATES}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def supervised_runs(tokenizer, tokenized: TokenizedConversation) -> list[str]:
    """The decoded text of each contiguous run of supervised tokens."""
    runs, current = [], []
    for token, on in zip(tokenized.input_ids.tolist(), tokenized.supervised.tolist()):
        if on:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(r) for r in [*runs, current] if r]


def tokenize_file(path: Path, tokenizer, **kwargs) -> tuple[list[Conversation], list[TokenizedConversation]]:
    conversations = read_conversations(path)
    template = resolve_chat_template(tokenizer)
    return conversations, tokenize_conversations(conversations, tokenizer, template, **kwargs)


# ------------------------------------------------------------------------------------------------- answer masks


@pytest.mark.parametrize("data_format", sorted(RECORDS))
@pytest.mark.parametrize("style", sorted(TEMPLATES))
def test_supervised_tokens_are_the_rendered_answers_with_their_end_of_turn(tmp_path, tokenizers, style, data_format):
    tokenizer = tokenizers[style]
    path = write_jsonl(tmp_path / "data.jsonl", RECORDS[data_format])
    _, tokenized = tokenize_file(path, tokenizer)
    for answers, conversation in zip(ANSWERS[data_format], tokenized):
        assert supervised_runs(tokenizer, conversation) == [expected_answer(style, a) for a in answers]
        # every token is the template's rendering, prompts included, and exactly the answers are supervised
        assert not conversation.supervised[0]


def test_generation_markers_and_prefix_rendering_give_identical_masks(tmp_path, tokenizers):
    marked, plain = tokenizers["chatml"], tokenizers["chatml-plain"]
    assert mask_method(marked, resolve_chat_template(marked)) == "generation"
    assert mask_method(plain, resolve_chat_template(plain)) == "prefix"
    for data_format, records in RECORDS.items():
        path = write_jsonl(tmp_path / f"{data_format}.jsonl", records)
        for a, b in zip(tokenize_file(path, marked)[1], tokenize_file(path, plain)[1]):
            assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.supervised, b.supervised)


@pytest.mark.parametrize("style", sorted(TEMPLATES))
def test_every_end_of_turn_token_of_an_answer_is_supervised(tmp_path, tokenizers, style):
    # TRL PR #5988: an end-of-turn token left out of the mask makes a model that never learns to stop.
    tokenizer = tokenizers[style]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>" if style.startswith("chatml") else "</s>")
    conversations, tokenized = tokenize_file(write_jsonl(tmp_path / "m.jsonl", RECORDS["messages"]), tokenizer)
    for conversation, tokens in zip(conversations, tokenized):
        at_end_of_turn = tokens.input_ids == end_of_turn
        answers = sum(m.role == "assistant" for m in conversation.messages)
        assert int((at_end_of_turn & tokens.supervised).sum()) == answers
        # ChatML ends every turn with <|im_end|>: those of prompts stay unsupervised
        assert int(at_end_of_turn.sum()) == (len(conversation.messages) if style.startswith("chatml") else answers)


def _warnings(function) -> list[str]:
    """The messages pptk.data.chat_template logs while ``function()`` runs."""
    logger = logging.getLogger("pptk.data.chat_template")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        function()
    finally:
        logger.removeHandler(handler)
    return seen


def test_generation_block_without_the_end_of_turn_is_reported(tmp_path, tokenizers):
    leaky = CHATML.replace("message['content'] + '<|im_end|>\n' }}{% endgeneration %}", "message['content'] }}"
                           "{% endgeneration %}{{ '<|im_end|>\n' }}")  # fmt: skip
    # the newline after <|im_end|> outside the block: immaterial, so no warning
    newline_out = CHATML.replace("'<|im_end|>\n' }}{% endgeneration %}", "'<|im_end|>' }}{% endgeneration %}{{ '\n' }}")
    assert leaky != CHATML != newline_out
    tokenizer = tokenizers["chatml"]
    records = write_jsonl(tmp_path / "m.jsonl", RECORDS["messages"])
    warnings = {}
    for name, text in (("leaky", leaky), ("newline_out", newline_out)):
        (tmp_path / f"{name}.jinja").write_text(text)
        template = resolve_chat_template(tokenizer, tmp_path / f"{name}.jinja")
        warnings[name] = _warnings(lambda: tokenize_conversations(read_conversations(records), tokenizer, template))  # noqa: B023
    seen = warnings["leaky"]
    assert [line.split(": ")[0] for line in seen] == [f"{records}:1"]
    assert "leave out '<|im_end|>\\n', '<|im_end|>\\n' and add nothing" in seen[0], seen
    assert warnings["newline_out"] == []


def test_train_on_prompt_supervises_every_token(tmp_path, tokenizers):
    path = write_jsonl(tmp_path / "m.jsonl", RECORDS["messages"])
    _, tokenized = tokenize_file(path, tokenizers["chatml"], train_on_prompt=True)
    assert all(t.supervised.all() for t in tokenized)
    rows = build_rows(tokenized, seq_len=256, pad_id=0)
    batch = rows.tensors(range(len(rows)))
    starts = batch.position_ids == 0
    assert torch.equal(batch.labels != IGNORE, ~starts & _real_tokens(rows, batch))


# ------------------------------------------------------------------------------------------------- formats


def test_formats_become_conversations_and_parquet_reads_like_jsonl(tmp_path):
    alpaca = read_conversations(write_jsonl(tmp_path / "a.jsonl", RECORDS["alpaca"]))
    assert alpaca[0].messages == (
        Message("user", "Explain what a generator is."),
        Message("assistant", "A function that yields values."),
    )
    assert alpaca[1].messages[0] == Message("user", "Translate to Python.\n\nadd one to x")
    completion = read_conversations(write_jsonl(tmp_path / "p.jsonl", RECORDS["prompt-completion"]))
    assert [m.role for c in completion for m in c.messages] == ["user", "assistant"] * 3
    assert [c.where for c in completion] == [f"{tmp_path / 'p.jsonl'}:{n}" for n in (1, 2, 3)]
    for data_format, all_records in RECORDS.items():
        records = [r for r in all_records if not isinstance(r.get("prompt"), list)]  # a column has one type
        pq.write_table(pa.Table.from_pylist(records), tmp_path / f"{data_format}.parquet")
        from_parquet = read_conversations(tmp_path / f"{data_format}.parquet")
        from_jsonl = read_conversations(write_jsonl(tmp_path / f"{data_format}.jsonl", records))
        assert [c.messages for c in from_parquet] == [c.messages for c in from_jsonl]
        assert from_parquet[1].where == f"{tmp_path / f'{data_format}.parquet'}:row 2"


def test_format_is_detected_from_the_first_record_unless_given(tmp_path):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    both = {"messages": turns, "prompt": "question", "completion": "answer"}
    path = write_jsonl(tmp_path / "both.jsonl", [both])
    assert read_conversations(path)[0].messages[0].content == "hi"
    assert read_conversations(path, format="prompt-completion")[0].messages[0].content == "question"


def test_eval_fraction_holds_out_whole_conversations_deterministically():
    conversations = [
        Conversation((Message("user", f"q{i}"), Message("assistant", f"a{i}")), f"f:{i}") for i in range(20)
    ]
    train, held_out = split_eval(conversations, eval_fraction=0.25, seed=3)
    assert len(held_out) == 5 and sorted(train + held_out, key=lambda c: int(c.where[2:])) == conversations
    assert split_eval(conversations, eval_fraction=0.25, seed=3) == (train, held_out)
    assert split_eval(conversations, eval_fraction=0.25, seed=4)[1] != held_out


# ------------------------------------------------------------------------------------------------- rows


def _real_tokens(rows, batch) -> torch.Tensor:
    """True at the positions conversations occupy (not padding), from the rows' own layout."""
    real = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    for b, row in enumerate(rows.rows):
        real[b, : sum(len(rows.conversations[c]) for c in row)] = True
    return real


def _many(tmp_path, tokenizer) -> list[TokenizedConversation]:
    """Every format's records, three times over (one file per format: a file holds one format)."""
    paths = [write_jsonl(tmp_path / f"{name}.jsonl", records * 3) for name, records in RECORDS.items()]
    return [t for path in paths for t in tokenize_file(path, tokenizer)[1]]


def test_packing_keeps_every_conversation_restarts_positions_and_masks_each_start(tmp_path, tokenizers):
    tokenized = _many(tmp_path, tokenizers["chatml"])
    rows = build_rows(tokenized, seq_len=128, pad_id=7)
    assert rows.packed and len(rows) < len(tokenized)
    batch = rows.tensors(np.arange(len(rows)))
    assert torch.equal(batch.attention_mask, torch.ones_like(batch.input_ids))  # see pptk.data.packing: on purpose
    placed = []
    for b, row in enumerate(rows.rows):
        start = 0
        for c in row:
            conversation = rows.conversations[c]
            end = start + len(conversation)
            ids = torch.from_numpy(conversation.input_ids.astype(np.int64))
            expected = ids.masked_fill(~torch.from_numpy(conversation.supervised), IGNORE)
            expected[0] = IGNORE
            assert torch.equal(batch.input_ids[b, start:end], ids)
            assert torch.equal(batch.labels[b, start:end], expected)
            assert torch.equal(batch.position_ids[b, start:end], torch.arange(end - start))
            placed.append(c)
            start = end
        assert (batch.input_ids[b, start:] == 7).all() and (batch.labels[b, start:] == IGNORE).all()
        assert (batch.labels[b] != IGNORE).any()
    assert sorted(placed) == list(range(len(tokenized)))
    stats = rows.stats
    assert stats.rows == len(rows) and stats.tokens == sum(len(t) for t in tokenized)
    assert stats.supervised_tokens == int((batch.labels != IGNORE).sum())
    assert stats.padding_fraction == pytest.approx(1 - stats.tokens / batch.input_ids.numel())


def test_packed_rows_never_attend_across_conversations(tmp_path, tokenizers):
    # The model side, unchanged: pptk.models.protocol builds the 4-D mask from these tensors as for --document-masking.
    from transformers import LlamaConfig

    from pptk.models.protocol import StageTensors, attention_mask_for

    rows = build_rows(_many(tmp_path, tokenizers["chatml"]), seq_len=128, pad_id=0)
    batch = rows.tensors(range(4))
    config = LlamaConfig(vocab_size=2048, hidden_size=8, num_attention_heads=2, num_hidden_layers=1)
    config._attn_implementation = "eager"
    stage = StageTensors(torch.zeros(4, 128, 8), batch.attention_mask, batch.position_ids)
    mask = attention_mask_for("causal", config, stage)
    assert mask is not None
    allowed = mask[:, 0] == 0
    segment = torch.full((4, 128), -1)  # from the rows' layout: conversation c, then the padding tail (-1)
    for b, row in enumerate(rows.rows[:4]):
        start = 0
        for c in row:
            segment[b, start : start + len(rows.conversations[c])] = c
            start += len(rows.conversations[c])
    assert (segment[:, -1] == -1).any()  # some row ends in padding
    same_segment = segment.unsqueeze(2) == segment.unsqueeze(1)
    assert torch.equal(allowed, same_segment & torch.ones(128, 128, dtype=torch.bool).tril())


def test_padded_rows_hold_one_conversation_each_as_packing_would(tmp_path, tokenizers):
    tokenized = _many(tmp_path, tokenizers["llama2"])
    packed, padded = (build_rows(tokenized, seq_len=128, pad_id=0, packing=p) for p in (True, False))
    assert not padded.packed and len(padded) == len(tokenized) and padded.rows[:3] == ((0,), (1,), (2,))
    p, q = packed.tensors(range(len(packed))), padded.tensors(range(len(padded)))
    assert torch.equal(q.position_ids, torch.arange(128).expand(len(padded), 128))
    for b, (c,) in enumerate(padded.rows):
        n = len(tokenized[c])
        assert torch.equal(q.attention_mask[b], (torch.arange(128) < n).long())
        assert (q.labels[b, n:] == IGNORE).all()
        row = next(r for r, held in enumerate(packed.rows) if c in held)
        start = sum(len(tokenized[i]) for i in packed.rows[row][: packed.rows[row].index(c)])
        assert torch.equal(q.input_ids[b, :n], p.input_ids[row, start : start + n])
        assert torch.equal(q.labels[b, :n], p.labels[row, start : start + n])
    assert padded.stats.supervised_tokens == packed.stats.supervised_tokens
    (ids, mask, positions), labels = padded.batch([0, 1])
    assert ids.dtype == mask.dtype == positions.dtype == labels.dtype == torch.long and ids.shape == (2, 128)


def test_best_fit_decreasing_fills_rows_tightly_and_deterministically():
    assert pack_best_fit([5, 4, 3, 3, 2, 1], seq_len=8) == [[0, 2], [1, 3, 5], [4]]
    lengths = list(np.random.default_rng(0).integers(1, 100, 500))
    rows = pack_best_fit(lengths, seq_len=128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert pack_best_fit(lengths, seq_len=128) == rows


def test_truncate_and_drop_are_counted(tmp_path, tokenizers):
    tokenizer = tokenizers["chatml"]
    long_answer = "The answer, in a great many words, " * 20
    records = [
        {"prompt": "Short question?", "completion": "Short answer."},
        {"prompt": "Tell me at length.", "completion": long_answer},  # cut inside the answer: truncated, kept
        {"prompt": "A very long question " * 40, "completion": "Yes."},  # cut before the answer: skipped
    ]
    _, tokenized = tokenize_file(write_jsonl(tmp_path / "t.jsonl", records), tokenizer)
    seq_len = 48
    assert len(tokenized[0]) <= seq_len < len(tokenized[1]) and len(tokenized[2]) > seq_len
    assert tokenized[1].supervised[:seq_len].any() and not tokenized[2].supervised[:seq_len].any()
    truncated = build_rows(tokenized, seq_len=seq_len, pad_id=0, truncation="truncate")
    stats = truncated.stats
    assert (stats.examples, stats.truncated, stats.dropped, stats.skipped_no_supervised) == (3, 1, 0, 1)
    assert sorted(len(c) for c in truncated.conversations) == sorted([len(tokenized[0]), seq_len])
    assert "1 truncated" in stats.describe() and "1 skipped without a supervised token" in stats.describe()
    dropped = build_rows(tokenized, seq_len=seq_len, pad_id=0, truncation="drop", packing=False).stats
    assert (dropped.truncated, dropped.dropped, dropped.skipped_no_supervised, dropped.rows) == (0, 2, 0, 1)
    with pytest.raises(PptkError, match=r"none of the 3 conversations is left to train on \(3 longer than seq_len 8"):
        build_rows(tokenized, seq_len=8, pad_id=0, truncation="drop")


def test_load_sft_data_end_to_end_with_an_eval_file_and_a_template_file(tmp_path, tokenizer_dir):
    tokenizer = make_tokenizer(tokenizer_dir, None)  # no template of its own
    (tmp_path / "template.json").write_text(json.dumps({"chat_template": LLAMA2}))
    train = write_jsonl(tmp_path / "train.jsonl", RECORDS["messages"] * 4)
    held_out = write_jsonl(tmp_path / "eval.jsonl", RECORDS["alpaca"])
    data = load_sft_data(
        [train], tokenizer=tokenizer, seq_len=96, eval_files=[held_out], template_file=tmp_path / "template.json"
    )
    assert data.template == ChatTemplate(LLAMA2, f"chat template file {tmp_path / 'template.json'}")
    assert data.supervision == "prefix" and data.train.stats.examples == 8 and data.eval is not None
    assert data.eval.stats.examples == 2 and "loss on prefix" in data.describe()
    by_fraction = load_sft_data(
        [train], tokenizer=tokenizer, seq_len=96, eval_fraction=0.25, template_file=tmp_path / "template.json"
    )
    assert (by_fraction.train.stats.examples, by_fraction.eval.stats.examples) == (6, 2)  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------------- bad input


def _line(path: Path, n: int) -> str:
    return re.escape(f"{path}:{n}: ")


BAD_RECORDS: dict[str, tuple[list[dict[str, Any]], int, str]] = {
    "missing field": (
        [{"prompt": "q", "completion": "a"}, {"prompt": "q"}],
        2,
        r"no 'completion' field, which the 'prompt-completion' format needs \(this record has: \['prompt'\]\)",
    ),
    "unknown role": (
        [{"messages": [{"role": "user", "content": "q"}, {"role": "gpt", "content": "a"}]}],
        1,
        r"messages item 2 has the unknown role 'gpt'; use one of system, user, assistant",
    ),
    "no assistant turn": (
        [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}],
        1,
        r"the conversation has no assistant turn \(roles: \['system', 'user'\]\)",
    ),
    "assistant first": (
        [{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}],
        1,
        r"the conversation starts with an assistant turn \(roles: \['assistant', 'user'\]\)",
    ),
    "unknown format": ([{"question": "q", "answer": "a"}], 1, r"cannot tell the chat data format from the fields"),
    "not a string": ([{"instruction": "q", "output": 3}], 1, r"'output' must be a string, got int 3"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_records_name_file_and_line(tmp_path, case):
    records, line, message = BAD_RECORDS[case]
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(PptkError, match=_line(path, line) + message):
        read_conversations(path)


def test_bad_files_and_options(tmp_path, tokenizers, tokenizer_dir):
    (empty := tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(PptkError, match=r"empty.jsonl' holds no records"):
        read_conversations(empty)
    (broken := tmp_path / "broken.jsonl").write_text('{"prompt": "q", "completion": "a"}\n{"prompt": \n')
    with pytest.raises(PptkError, match=_line(broken, 2) + r"not JSON"):
        read_conversations(broken)
    with pytest.raises(PptkError, match=r"has no chat template and no template file was given"):
        resolve_chat_template(make_tokenizer(tokenizer_dir, None))
    (blank := tmp_path / "blank.jinja").write_text(" \n")
    with pytest.raises(PptkError, match=r"blank.jinja' is empty"):
        resolve_chat_template(tokenizers["chatml"], blank)
    good = write_jsonl(tmp_path / "good.jsonl", RECORDS["alpaca"])
    with pytest.raises(PptkError, match=r"both eval files and eval_fraction 0.1 were given"):
        load_sft_data([good], tokenizer=tokenizers["chatml"], seq_len=64, eval_files=[good], eval_fraction=0.1)
    with pytest.raises(PptkError, match=r"unknown chat data format 'sharegpt'; use one of messages, prompt-compl"):
        load_sft_data([good], tokenizer=tokenizers["chatml"], seq_len=64, format="sharegpt")
    with pytest.raises(PptkError, match=r"unknown truncation 'cut'; use one of truncate, drop"):
        load_sft_data([good], tokenizer=tokenizers["chatml"], seq_len=64, truncation="cut")


def test_alternation_the_template_refuses_is_its_own_error_with_file_and_line(tmp_path, tokenizers):
    turns = [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}]
    path = write_jsonl(tmp_path / "turns.jsonl", [*RECORDS["messages"], {"messages": turns}])
    with pytest.raises(PptkError, match=_line(path, 3) + r".*refuses this conversation: Conversation roles must alt"):
        tokenize_file(path, tokenizers["llama2"])


def test_masks_that_cannot_be_right_are_errors(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "m.jsonl", RECORDS["messages"])
    tokenizer = make_tokenizer(tokenizer_dir, None)
    marks_nothing = CHATML.replace("message['role'] == 'assistant'", "message['role'] == 'nobody'")
    marks_everything = "{% generation %}" + CHATML_PLAIN + "{% endgeneration %}"
    # a template that rewrites earlier turns (as reasoning templates drop past thinking): no prefix to find
    rewrites = CHATML_PLAIN.replace("message['content'] + '<|im_end|>", "(message['content'] if loop.last else "
                                    "'...') + '<|im_end|>")  # fmt: skip
    for template, message in (
        (marks_nothing, r"marks none of this conversation's \d+ tokens as the answers \(method: generation\)"),
        (marks_everything, r"marks all of this conversation's \d+ tokens"),
        (rewrites, r"tokenizes the prompt before message 3 \(assistant\) as \d+ tokens that are not a prefix"),
    ):
        tokenizer.chat_template = template
        with pytest.raises(PptkError, match=_line(path, 1) + "the tokenizer's chat template " + message):
            tokenize_file(path, tokenizer)
