# Preference pairs in process (pptk.data.pairs): TRL's three formats from JSONL and Parquet, answer masks equal to
# SFT's supervision of the same answer, the prompt-length and truncation rules, and every bad input's message.
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pptk.data.chat import Conversation, Message
from pptk.data.chat_template import resolve_chat_template, tokenize_conversation
from pptk.data.demo_chat import demo_chat_tokenizer
from pptk.data.pairs import PreferencePair, encode_pair, encode_pairs, read_pairs, split_eval_pairs
from pptk.errors import PptkError

GENERATION = (  # ChatML with {% generation %} markers: transformers' assistant masks instead of prefix rendering
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
USER = {"role": "user", "content": "What is 2 plus 3?"}
GOOD = {"role": "assistant", "content": "2 plus 3 is 5."}
BAD = {"role": "assistant", "content": "It is 7."}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return demo_chat_tokenizer(tmp_path_factory.mktemp("pairs") / "tokenizer")


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_three_formats_read_as_the_same_pair(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    standard = write_jsonl(
        tmp_path / "s.jsonl", [{"prompt": USER["content"], "chosen": GOOD["content"], "rejected": BAD["content"]}]
    )
    conversational = write_jsonl(tmp_path / "c.jsonl", [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}])
    implicit = write_jsonl(tmp_path / "i.jsonl", [{"chosen": [system, USER, GOOD], "rejected": [system, USER, BAD]}])
    table = pa.Table.from_pylist([{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}])
    pq.write_table(table, tmp_path / "c.parquet")

    pairs = read_pairs([standard, conversational, tmp_path / "c.parquet"])
    assert [p.where for p in pairs] == [f"{standard}:1", f"{conversational}:1", f"{tmp_path / 'c.parquet'}:row 1"]
    for pair in pairs:
        assert (pair.prompt, pair.chosen, pair.rejected) == ([USER], [GOOD], [BAD])
    (pair,) = read_pairs(implicit)
    assert (pair.prompt, pair.chosen, pair.rejected) == ([system, USER], [GOOD], [BAD])
    # An implicit prompt may hold earlier assistant turns: the answers start where the two conversations part.
    follow = {"role": "user", "content": "And doubled?"}
    write_jsonl(tmp_path / "m.jsonl", [{"chosen": [USER, GOOD, follow, GOOD], "rejected": [USER, GOOD, follow, BAD]}])
    (pair,) = read_pairs(tmp_path / "m.jsonl", format="implicit-prompt")
    assert pair.prompt == [USER, GOOD, follow] and pair.chosen == [GOOD] and pair.rejected == [BAD]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"prompt": "hi", "chosen": "a"}, r"s\.jsonl:2: no 'rejected' field: a preference pair needs both"),
        ({"prompt": "hi", "rejected": "a", "chosen": None}, r"s\.jsonl:2: no 'chosen' field"),
        ({"prompt": "hi", "chosen": "same", "rejected": "same"}, r"s\.jsonl:2: 'chosen' and 'rejected' are identical"),
        ({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, r"s\.jsonl:2: 'prompt' must be a string in the"),
        ({"chosen": "a", "rejected": "b"}, r"s\.jsonl:2: no 'prompt' field, which the 'standard' format needs"),
        ({"prompt": "hi", "chosen": "a", "rejected": 3}, r"s\.jsonl:2: 'rejected' must be a string"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, record, expected):
    good = {"prompt": "hi", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "s.jsonl", [good, record])
    with pytest.raises(PptkError, match=expected):
        read_pairs(path)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"chosen": [USER, GOOD], "rejected": [USER, GOOD]}, "are identical"),
        ({"chosen": [GOOD], "rejected": [BAD]}, "share no first message, so there is no prompt"),
        ({"chosen": [USER, GOOD], "rejected": [USER]}, "the rejected answer must start with an assistant turn"),
        ({"prompt": [USER], "chosen": [USER], "rejected": [BAD]}, "the chosen answer must start with an assistant"),
        ({"prompt": [USER], "chosen": [GOOD], "rejected": [GOOD]}, "are identical"),
        ({"prompt": [USER, GOOD], "chosen": [BAD], "rejected": [GOOD]}, "the prompt must hold a user turn and end"),
        ({"prompt": [{"role": "human", "content": "x"}], "chosen": [GOOD], "rejected": [BAD]}, "unknown role 'human'"),
    ],
)
def test_bad_conversational_records(tmp_path, record, expected):
    path = write_jsonl(tmp_path / "c.jsonl", [record])
    with pytest.raises(PptkError, match=expected):
        read_pairs(path)


def test_files_and_formats_are_checked(tmp_path):
    with pytest.raises(PptkError, match="does not exist"):
        read_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PptkError, match="holds no records"):
        read_pairs(tmp_path / "empty.jsonl")
    with pytest.raises(PptkError, match="unknown preference data format 'kto'"):
        read_pairs(tmp_path / "empty.jsonl", format="kto")
    pairs = [PreferencePair([USER], [GOOD], [BAD], f"f:{i}") for i in range(10)]
    train, held_out = split_eval_pairs(pairs, eval_fraction=0.2, seed=1)
    assert len(held_out) == 2 and sorted(p.where for p in train + held_out) == sorted(p.where for p in pairs)
    assert split_eval_pairs(pairs, eval_fraction=0.2, seed=1) == (train, held_out)


@pytest.mark.parametrize("template", ["tokenizer", "generation"])
def test_answer_masks_are_sfts_supervision_of_the_answer(tokenizer, template):
    """The masked tokens decode to the answer plus its end-of-turn token, and equal what SFT supervises in the last
    turn of the same conversation; a multi-turn prompt's own assistant turn is not part of the answer."""
    chat_template = resolve_chat_template(tokenizer) if template == "tokenizer" else None
    if template == "generation":
        from pptk.data.chat_template import ChatTemplate

        chat_template = ChatTemplate(GENERATION, "test template")
    follow = {"role": "user", "content": "And doubled?"}
    pair = PreferencePair([USER, GOOD, follow], [{"role": "assistant", "content": "10."}], [BAD], "p:1")
    encoded = encode_pair(pair, tokenizer, seq_len=256, chat_template=chat_template)
    for ids, mask, answer in (
        (encoded.chosen_ids, encoded.chosen_answer_mask, "10."),
        (encoded.rejected_ids, encoded.rejected_answer_mask, BAD["content"]),
    ):
        assert len(ids) == len(mask) and set(mask) == {0, 1}
        assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == f"{answer}<|im_end|>\n"
        first = mask.index(1)
        assert first == encoded.prompt_tokens and all(mask[first:])  # one run, to the end
    conversation = Conversation(tuple(Message(**m) for m in pair.prompt + pair.chosen), "p:1")
    sft = tokenize_conversation(conversation, tokenizer, chat_template or resolve_chat_template(tokenizer))
    assert sft.input_ids.tolist() == encoded.chosen_ids
    assert sft.supervised.sum() > sum(encoded.chosen_answer_mask)  # SFT also trains on the prompt's answer
    assert (
        sft.supervised[encoded.prompt_tokens :].tolist()
        == [bool(m) for m in encoded.chosen_answer_mask][encoded.prompt_tokens :]
    )
    assert encoded.chosen_ids[: encoded.prompt_tokens] == encoded.rejected_ids[: encoded.prompt_tokens]


def test_prompt_too_long_and_truncated_answers(tokenizer):
    pair = PreferencePair([USER], [{"role": "assistant", "content": "five " * 40}], [BAD], "p:7")
    full = encode_pair(pair, tokenizer, seq_len=512)
    prompt = full.prompt_tokens
    with pytest.raises(PptkError, match=rf"p:7: the prompt alone is {prompt} tokens.*seq_len {prompt}; raise"):
        encode_pair(pair, tokenizer, seq_len=prompt)
    cut = encode_pair(pair, tokenizer, seq_len=prompt + 3)
    assert cut.truncated and not full.truncated
    assert cut.chosen_ids == full.chosen_ids[: prompt + 3] and cut.chosen_answer_mask == [0] * prompt + [1] * 3
    assert len(cut.rejected_ids) <= prompt + 3
    assert encode_pairs([pair, pair], tokenizer, seq_len=512) == [full, full]
