# Preference pairs (a prompt, a chosen and a rejected answer) read from JSONL or Parquet and tokenized for DPO/reward.
"""Three record formats, TRL's preference formats, each becoming a ``PreferencePair`` of chat messages:

- ``standard``: ``{"prompt": "...", "chosen": "...", "rejected": "..."}`` -> a user turn, an assistant answer each;
- ``conversational``: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``;
- ``implicit-prompt``: ``{"chosen": [messages], "rejected": [messages]}``, whole conversations sharing their first
  messages: the shared messages are the prompt, the rest the answers (TRL's ``extract_prompt``).

The format is detected from a file's first record unless given. Every problem is one PptkError naming ``file:line``
(``file:row N`` for Parquet): a missing side, chosen identical to rejected, an answer that is not an assistant turn.

``encode_pair`` renders ``prompt + chosen`` and ``prompt + rejected`` with the chat template exactly as SFT does
(``pptk.data.chat_template``) and marks the answer tokens, end-of-turn included, as SFT supervises them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pptk.data.chat import ROLES, Conversation, Message, read_records, shorten
from pptk.data.chat_template import (
    ChatTemplate,
    encode_texts,
    mask_method,
    render_chat,
    resolve_chat_template,
    tokenize_conversation,
)
from pptk.errors import PptkError

FORMATS = ("standard", "conversational", "implicit-prompt")


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[dict]  # the chat messages before the answer
    chosen: list[dict]  # the preferred answer's turns
    rejected: list[dict]  # the dispreferred answer's turns
    where: str = ""  # "file:line" (JSONL) or "file:row N" (Parquet) of the record


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of prompt + answer, each side at most seq_len long; the mask is 1 on the answer's tokens."""

    chosen_ids: list[int]
    chosen_answer_mask: list[int]
    rejected_ids: list[int]
    rejected_answer_mask: list[int]
    where: str = ""
    prompt_tokens: int = 0
    truncated: bool = False  # an answer was cut at seq_len


def read_pairs(paths: str | Path | Sequence[str | Path], *, format: str | None = None) -> list[PreferencePair]:
    """Every record of every .jsonl, .jsonl.gz or .parquet file as a checked pair, in file order.

    format: one of FORMATS; None detects it from each file's first record (every record must then have its shape).
    """
    check_format(format)
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise PptkError("no preference data files given; pass at least one .jsonl, .jsonl.gz or .parquet file")
    pairs = []
    for path in map(Path, paths):
        if not path.is_file():
            raise PptkError(f"preference data file {str(path)!r} does not exist; check the path")
        file_format = format
        count = 0
        for where, record in read_records(path):
            file_format = file_format or detect_format(record, where)
            pairs.append(to_pair(record, file_format, where))
            count += 1
        if not count:
            raise PptkError(f"preference data file {str(path)!r} holds no records; fill it or point to another file")
    return pairs


def check_format(format: str | None) -> None:
    if format is not None and format not in FORMATS:
        raise PptkError(
            f"unknown preference data format {format!r}; use one of {', '.join(FORMATS)} (or none to detect it)"
        )


def detect_format(record: dict[str, Any], where: str) -> str:
    _check_sides(record, where)
    if record.get("prompt") is None:
        return "implicit-prompt"
    return "standard" if isinstance(record["prompt"], str) else "conversational"


def to_pair(record: dict[str, Any], format: str, where: str) -> PreferencePair:
    """One record of ``format`` as a checked pair: both sides present, assistant answers, the two differing."""
    _check_sides(record, where)
    if format == "implicit-prompt":
        chosen = _messages(record["chosen"], "chosen", where)
        rejected = _messages(record["rejected"], "rejected", where)
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            raise PptkError(
                f"{where}: 'chosen' and 'rejected' share no first message, so there is no prompt to extract "
                "(implicit-prompt format); start both with the same prompt turns, or give a 'prompt' field"
            )
    else:
        if record.get("prompt") is None:
            raise PptkError(
                f"{where}: no 'prompt' field, which the {format!r} format needs (this record has: {sorted(record)}); "
                "every record of a file has one format (its first record's, unless given): fix or remove this record"
            )
        strings = format == "standard"
        prompt = _side(record["prompt"], "prompt", "user", where, strings=strings)
        chosen = _side(record["chosen"], "chosen", "assistant", where, strings=strings)
        rejected = _side(record["rejected"], "rejected", "assistant", where, strings=strings)
    if chosen == rejected:
        raise PptkError(
            f"{where}: 'chosen' and 'rejected' are identical ({shorten([m.content for m in chosen])}), so there is "
            "no preference to learn; fix the record or remove it"
        )
    _check_prompt(prompt, where)
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or answer[0].role != "assistant":
            roles = [m.role for m in answer]
            raise PptkError(
                f"{where}: the {name} answer must start with an assistant turn, got roles {roles}; put the answer "
                "after the prompt's last user turn"
            )
    return PreferencePair(_dicts(prompt), _dicts(chosen), _dicts(rejected), where)


def split_eval_pairs(
    pairs: Sequence[PreferencePair], *, eval_fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, eval): a seeded random choice of whole pairs held out, each part kept in file order."""
    if not 0 < eval_fraction < 1:
        raise PptkError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    n_eval = round(len(pairs) * eval_fraction)
    if not 0 < n_eval < len(pairs):
        raise PptkError(
            f"eval_fraction {eval_fraction} of {len(pairs)} pairs leaves {n_eval} for eval and {len(pairs) - n_eval} "
            "for training; both need at least one: give more data, another eval_fraction, or an eval file"
        )
    held_out = set(np.random.default_rng([seed]).permutation(len(pairs))[:n_eval].tolist())
    train = [p for i, p in enumerate(pairs) if i not in held_out]
    return train, [p for i, p in enumerate(pairs) if i in held_out]


# ------------------------------------------------------------------------------------------------------ encoding


def encode_pair(
    pair: PreferencePair,
    tokenizer: Any,
    *,
    seq_len: int,
    chat_template: ChatTemplate | str | Path | None = None,
) -> EncodedPair:
    """Both sides rendered with the chat template (the tokenizer's, a file's, or a ChatTemplate) and tokenized.

    The answer mask is SFT's supervision restricted to the tokens after the prompt (rendered with the generation
    prompt), so a multi-turn prompt's own assistant turns are context, not answer. A prompt that leaves no room for an
    answer token within seq_len is an error; longer answers are cut at seq_len.
    """
    template = (
        chat_template if isinstance(chat_template, ChatTemplate) else resolve_chat_template(tokenizer, chat_template)
    )
    method = mask_method(tokenizer, template)
    where = pair.where or "a preference pair"
    (prompt_ids,) = encode_texts(tokenizer, [render_chat(pair.prompt, tokenizer, template, where, prompt=True)])
    if len(prompt_ids) >= seq_len:
        raise PptkError(
            f"{where}: the prompt alone is {len(prompt_ids)} tokens, which leaves no room for an answer in "
            f"seq_len {seq_len}; raise --seq-len above {len(prompt_ids)}, shorten the prompt, or remove the record"
        )
    sides = []
    truncated = False
    for name, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        conversation = Conversation(tuple(Message(m["role"], m["content"]) for m in pair.prompt + answer), where)
        tokenized = tokenize_conversation(conversation, tokenizer, template, method=method)
        ids = tokenized.input_ids.tolist()
        if ids[: len(prompt_ids)] != prompt_ids:
            raise PptkError(
                f"{where}: {template.source} renders the prompt with the generation prompt as tokens that do not "
                f"start the prompt + {name} conversation, so the {name} answer cannot be located; use a template "
                "whose generation prompt is the start of the assistant turn it renders"
            )
        mask = tokenized.supervised.copy()
        mask[: len(prompt_ids)] = False
        truncated = truncated or len(ids) > seq_len
        ids, mask = ids[:seq_len], mask[:seq_len]
        if not mask.any():
            raise PptkError(
                f"{where}: no token of the {name} answer is marked as an answer by {template.source} within "
                f"seq_len {seq_len}; check the template's assistant branch, or raise --seq-len"
            )
        sides.append((ids, mask.astype(int).tolist()))
    (chosen_ids, chosen_mask), (rejected_ids, rejected_mask) = sides
    return EncodedPair(chosen_ids, chosen_mask, rejected_ids, rejected_mask, where, len(prompt_ids), truncated)


def encode_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer: Any,
    *,
    seq_len: int,
    chat_template: ChatTemplate | str | Path | None = None,
) -> list[EncodedPair]:
    """encode_pair over many pairs, the template resolved once."""
    template = (
        chat_template if isinstance(chat_template, ChatTemplate) else resolve_chat_template(tokenizer, chat_template)
    )
    return [encode_pair(pair, tokenizer, seq_len=seq_len, chat_template=template) for pair in pairs]


# ------------------------------------------------------------------------------------------------ fields and turns


def _check_sides(record: dict[str, Any], where: str) -> None:
    missing = [side for side in ("chosen", "rejected") if record.get(side) is None]
    if missing:
        raise PptkError(
            f"{where}: no {' or '.join(map(repr, missing))} field: a preference pair needs both a 'chosen' and a "
            f"'rejected' answer (this record has: {sorted(record)}); fix or remove this record"
        )


def _side(value: Any, field: str, role: str, where: str, *, strings: bool) -> tuple[Message, ...]:
    if strings:
        if not isinstance(value, str):
            raise PptkError(
                f"{where}: {field!r} must be a string in the 'standard' format, got {shorten(value)}; a file has one "
                "format (its first record's, unless given): use strings or message lists throughout"
            )
        return (Message(role, value),)
    if isinstance(value, str):
        raise PptkError(
            f"{where}: {field!r} must be a list of messages in the 'conversational' format, got the string "
            f"{shorten(value)}; a file has one format (its first record's, unless given)"
        )
    return _messages(value, field, where)


def _messages(value: Any, field: str, where: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise PptkError(
            f"{where}: {field!r} must be a non-empty list of {{'role', 'content'}} objects, got {shorten(value)}"
        )
    messages = []
    for number, item in enumerate(value, 1):
        if not isinstance(item, dict) or "role" not in item or not isinstance(item.get("content"), str):
            raise PptkError(
                f"{where}: {field} item {number} must be an object with 'role' and a string 'content', got "
                f"{shorten(item)}"
            )
        if item["role"] not in ROLES:
            raise PptkError(
                f"{where}: {field} item {number} has the unknown role {item['role']!r}; use one of {', '.join(ROLES)}"
            )
        messages.append(Message(item["role"], item["content"]))
    return tuple(messages)


def _check_prompt(prompt: tuple[Message, ...], where: str) -> None:
    roles = [m.role for m in prompt]
    if not prompt or roles[-1] == "assistant" or all(role == "system" for role in roles):
        raise PptkError(
            f"{where}: the prompt must hold a user turn and end before the answer (roles: {roles}); put the turn "
            "the answers reply to last in the prompt"
        )


def _dicts(messages: tuple[Message, ...]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]
