# Instruction-tuning records (chat messages, prompt/completion, Alpaca) read from JSONL or Parquet as conversations.
"""Three record formats, each becoming a conversation of ``Message(role, content)``:

- ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``;
- ``prompt-completion``: ``{"prompt": "...", "completion": "..."}`` -> user / assistant (each may also be a list of
  messages, TRL's conversational prompt-completion, which is concatenated);
- ``alpaca``: ``{"instruction": "...", "input": "...", "output": "..."}`` -> user (the instruction, then a blank line
  and the input when it is not empty, as the Alpaca convention joins them) / assistant (the output).

The format is detected from a file's first record unless given. Every problem is one PptkError naming ``file:line``
(``file:row N`` for Parquet): a record without the format's fields, an unknown role, a conversation without an
assistant turn, bad JSON, an empty file.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pptk.errors import PptkError

FORMATS = ("messages", "prompt-completion", "alpaca")
ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
# The fields that identify each format, in the order detection tries them.
_REQUIRED = {
    "messages": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    where: str  # "file:line" (JSONL) or "file:row N" (Parquet) of the record

    def as_dicts(self, end: int | None = None) -> list[dict[str, str]]:
        """The first ``end`` messages (all by default) as the dicts ``apply_chat_template`` takes."""
        return [{"role": m.role, "content": m.content} for m in self.messages[:end]]


def read_conversations(path: str | Path, *, format: str | None = None) -> list[Conversation]:
    """Every record of a .jsonl, .jsonl.gz or .parquet file as a checked conversation, in file order.

    format: one of FORMATS; None detects it from the first record (every record must then have its fields).
    """
    path = Path(path)
    check_format(format)
    if not path.is_file():
        raise PptkError(f"chat data file {str(path)!r} does not exist; check the path")
    conversations = []
    for where, record in read_records(path):
        format = format or detect_format(record, where)
        conversations.append(to_conversation(record, format, where))
    if not conversations:
        raise PptkError(f"chat data file {str(path)!r} holds no records; fill it or point to another file")
    return conversations


def check_format(format: str | None) -> None:
    if format is not None and format not in FORMATS:
        raise PptkError(f"unknown chat data format {format!r}; use one of {', '.join(FORMATS)} (or none to detect it)")


def detect_format(record: dict[str, Any], where: str) -> str:
    """The first format whose fields the record has (a field holding null counts as absent)."""
    for name, fields in _REQUIRED.items():
        if all(record.get(field) is not None for field in fields):
            return name
    raise PptkError(
        f"{where}: cannot tell the chat data format from the fields {sorted(record)}; expected 'messages' (chat), "
        "'prompt' + 'completion', or 'instruction' + 'output' (Alpaca, 'input' optional): rename the fields, or give "
        f"the format explicitly (one of {', '.join(FORMATS)})"
    )


def to_conversation(record: dict[str, Any], format: str, where: str) -> Conversation:
    """One record of ``format`` as a checked conversation (roles known, at least one assistant turn)."""
    missing = [field for field in _REQUIRED[format] if record.get(field) is None]
    if missing:
        raise PptkError(
            f"{where}: no {' or '.join(map(repr, missing))} field, which the {format!r} format needs (this record "
            f"has: {sorted(record)}); every record of a file has one format (its first record's, unless given): "
            "fix or remove this record"
        )
    if format == "messages":
        messages = _messages(record["messages"], "messages", where)
    elif format == "prompt-completion":
        prompt = _turns(record["prompt"], "prompt", "user", where)
        completion = _turns(record["completion"], "completion", "assistant", where)
        messages = prompt + completion
    else:
        instruction = _text(record["instruction"], "instruction", where)
        extra = _text(record.get("input") or "", "input", where)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = (Message("user", user), Message("assistant", _text(record["output"], "output", where)))
    _check_turns(messages, where)
    return Conversation(messages, where)


def split_eval(
    conversations: Sequence[Conversation], *, eval_fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """(train, eval): a seeded random choice of whole conversations held out, each part kept in file order."""
    if not 0 < eval_fraction < 1:
        raise PptkError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    n_eval = round(len(conversations) * eval_fraction)
    if not 0 < n_eval < len(conversations):
        raise PptkError(
            f"eval_fraction {eval_fraction} of {len(conversations)} conversations leaves {n_eval} for eval and "
            f"{len(conversations) - n_eval} for training; both need at least one: give more data, another "
            "eval_fraction, or an eval file"
        )
    held_out = set(np.random.default_rng([seed]).permutation(len(conversations))[:n_eval].tolist())
    train = [c for i, c in enumerate(conversations) if i not in held_out]
    return train, [c for i, c in enumerate(conversations) if i in held_out]


# ------------------------------------------------------------------------------------------------ fields and turns


def _text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise PptkError(f"{where}: {field!r} must be a string, got {type(value).__name__} {shorten(value)}")
    return value


def _turns(value: Any, field: str, role: str, where: str) -> tuple[Message, ...]:
    """A prompt or completion: a string (one turn of ``role``) or a list of messages."""
    if isinstance(value, list):
        return _messages(value, field, where)
    return (Message(role, _text(value, field, where)),)


def _messages(value: Any, field: str, where: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise PptkError(
            f"{where}: {field!r} must be a non-empty list of {{'role', 'content'}} objects, got {shorten(value)}"
        )
    messages = []
    for number, item in enumerate(value, 1):
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise PptkError(
                f"{where}: {field} item {number} must be an object with 'role' and 'content', got {shorten(item)}"
            )
        role = item["role"]
        if role not in ROLES:
            raise PptkError(
                f"{where}: {field} item {number} has the unknown role {role!r}; use one of {', '.join(ROLES)} "
                "(rename e.g. 'human'/'gpt' to 'user'/'assistant')"
            )
        messages.append(Message(role, _text(item["content"], f"{field} item {number} content", where)))
    return tuple(messages)


def _check_turns(messages: tuple[Message, ...], where: str) -> None:
    roles = [m.role for m in messages]
    if "assistant" not in roles:
        raise PptkError(
            f"{where}: the conversation has no assistant turn (roles: {roles}), so nothing would be learned from "
            "it; add the answer or remove the record"
        )
    if next(role for role in roles if role != "system") == "assistant":
        # Its answer would have no prompt to follow: no template renders that, and prefix rendering has no prefix.
        raise PptkError(
            f"{where}: the conversation starts with an assistant turn (roles: {roles}); put the user turn it "
            "answers first, or remove the record"
        )


def shorten(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------------------------------------------- records


def read_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from _parquet_records(path)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        yield from _jsonl_records(path)
    else:
        hint = " (a .json array converts with: jq -c '.[]' FILE.json > FILE.jsonl)" if name.endswith(".json") else ""
        raise PptkError(f"{str(path)!r}: unknown chat data type; use {', '.join(SUFFIXES)}{hint}")


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    number = 0
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PptkError(f"{where}: not JSON ({err.msg}); .jsonl wants one object per line") from None
                if not isinstance(record, dict):
                    raise PptkError(f"{where}: expected a JSON object, got {type(record).__name__}")
                yield where, record
    except UnicodeDecodeError:
        raise PptkError(f"{path}:{number + 1}: not UTF-8 text; is it a binary file? Save it as UTF-8") from None
    except (OSError, EOFError) as err:
        raise PptkError(f"chat data file {str(path)!r} cannot be read ({err}); check the file") from None


def _parquet_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise PptkError(f"chat data file {str(path)!r} is not a readable Parquet file ({err}); check it") from None
    row = 0
    # A row group at a time: list<struct<role, content>> columns arrive as lists of dicts.
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", record
