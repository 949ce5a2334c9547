# Supervised fine-tuning data in one call: chat files -> checked conversations -> template tokens and masks -> rows.
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pptk.data.chat import Conversation, check_format, read_conversations, split_eval
from pptk.data.chat_template import ChatTemplate, mask_method, resolve_chat_template, tokenize_conversations
from pptk.data.packing import TRUNCATION, ChatRows, build_rows, pad_id_of
from pptk.errors import PptkError

SAMPLE_PROMPTS = 8  # kept for the samples a finished run prints


@dataclass(frozen=True, eq=False)
class SftData:
    train: ChatRows
    eval: ChatRows | None
    template: ChatTemplate  # save it with the tokenizer of an exported model (tokenizer.chat_template = text)
    supervision: str  # "generation" / "prefix" (how answers were found) or "every token" (train_on_prompt)
    sample_prompts: tuple[tuple[dict[str, str], ...], ...] = ()  # held-out prompts (messages up to the last answer)

    def describe(self) -> str:
        rows = "packed" if self.train.packed else "padded"
        held_out = f"; eval: {self.eval.stats.describe()}" if self.eval is not None else ""
        return (
            f"train: {self.train.stats.describe()}{held_out}; {rows} rows of {self.train.seq_len} tokens, "
            f"{self.template.source}, loss on {self.supervision}"
        )


def load_sft_data(
    train_files: Sequence[str | Path],
    *,
    tokenizer: Any,
    seq_len: int,
    eval_files: Sequence[str | Path] = (),
    eval_fraction: float | None = None,
    seed: int = 0,
    format: str | None = None,
    template_file: str | Path | None = None,
    train_on_prompt: bool = False,
    packing: bool = True,
    truncation: str = "truncate",
) -> SftData:
    """Everything checked before anything is tokenized: options, the template, then every record of every file.

    The held-out split: ``eval_files``, or ``eval_fraction`` of the training conversations (seeded, whole
    conversations), or none. format: one of FORMATS for every file, or None to detect it per file.
    """
    if not train_files:
        raise PptkError("no chat data files given; pass at least one .jsonl, .jsonl.gz or .parquet file")
    check_format(format)
    if seq_len < 2:
        raise PptkError(f"seq_len must be at least 2 (a token and the one it predicts), got {seq_len}")
    if truncation not in TRUNCATION:
        raise PptkError(f"unknown truncation {truncation!r}; use one of {', '.join(TRUNCATION)}")
    if eval_files and eval_fraction:
        raise PptkError(
            f"both eval files and eval_fraction {eval_fraction} were given; hold out either a file or a fraction"
        )
    template = resolve_chat_template(tokenizer, template_file)
    train = _read(train_files, format)
    held_out: list[Conversation] | None = _read(eval_files, format) if eval_files else None
    if eval_fraction:
        train, held_out = split_eval(train, eval_fraction=eval_fraction, seed=seed)

    def rows(conversations: list[Conversation]) -> ChatRows:
        tokenized = tokenize_conversations(conversations, tokenizer, template, train_on_prompt=train_on_prompt)
        pad_id = pad_id_of(tokenizer)
        return build_rows(tokenized, seq_len=seq_len, pad_id=pad_id, packing=packing, truncation=truncation)

    return SftData(
        sample_prompts=_prompts(held_out or train, SAMPLE_PROMPTS),
        train=rows(train),
        eval=rows(held_out) if held_out is not None else None,
        template=template,
        supervision="every token" if train_on_prompt else mask_method(tokenizer, template),
    )


def _prompts(conversations: list[Conversation], count: int) -> tuple[tuple[dict[str, str], ...], ...]:
    """The first ``count`` conversations' messages before their last assistant turn: what a model is asked."""
    prompts = []
    for conversation in conversations[:count]:
        last = max(i for i, m in enumerate(conversation.messages) if m.role == "assistant")
        if last > 0:
            prompts.append(tuple(conversation.as_dicts(last)))
    return tuple(prompts)


def _read(paths: Sequence[str | Path], format: str | None) -> list[Conversation]:
    return [c for path in paths for c in read_conversations(path, format=format)]
