# Tokenized conversations into fixed seq_len rows: packed (positions restart per conversation) or one per row, padded.
"""The rows are the tensors pptk's decoders already take for ``--document-masking`` pretraining (see
``pptk.models.protocol`` and ``pptk.tasks.causal_lm.lm_batch``): inputs ``(input_ids, attention_mask, position_ids)``
and ``labels``, all int64 ``[batch, seq_len]``.

Packed rows (the default): several conversations per row, best fit decreasing (as TRL's ``pack_dataset``). Position
ids restart at 0 at each conversation, and the tail of a row that no conversation fills is one more "conversation"
of padding with positions of its own. The attention mask is all ones, on purpose: transformers builds a
block-diagonal causal mask from restarting position ids only when no 2-D padding mask is given
(``masking_utils.find_packed_sequence_indices``), so a zero in it would let conversations see each other.

Padded rows (``packing=False``): one conversation per row, right padding with attention mask 0 and positions
0..seq_len-1, as Hugging Face pads.

Labels are the input ids where a token is supervised and -100 elsewhere: padding, prompts (unless trained on), and
the first token of every conversation, which Hugging Face's shifted loss would otherwise ask the previous
conversation's last token to predict. Every row holds at least one label, so no micro-batch divides by zero.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pptk.data.chat_template import TokenizedConversation
from pptk.data.encode import IGNORE
from pptk.errors import PptkError
from pptk.logs import get_logger

log = get_logger(__name__)
TRUNCATION = ("truncate", "drop")  # what happens to a conversation longer than seq_len


@dataclass(frozen=True)
class ChatDataStats:
    examples: int  # conversations read
    skipped_no_supervised: int  # left out: no supervised token (after truncation)
    truncated: int  # cut to seq_len and kept
    dropped: int  # longer than seq_len, left out (truncation="drop")
    rows: int
    tokens: int  # conversation tokens in the rows (padding not counted)
    padding_fraction: float  # of the rows' rows * seq_len positions
    supervised_tokens: int  # labels that are not -100: the targets the loss averages over

    def describe(self) -> str:
        left_out = [
            f"{n} {what}"
            for n, what in (
                (self.truncated, "truncated"),
                (self.dropped, "dropped as too long"),
                (self.skipped_no_supervised, "skipped without a supervised token"),
            )
            if n
        ]
        return (
            f"{self.examples} conversations -> {self.rows} rows, {self.tokens:,} tokens, "
            f"{self.supervised_tokens:,} supervised, {self.padding_fraction:.1%} padding"
            + (f" ({', '.join(left_out)})" if left_out else "")
        )


@dataclass(frozen=True, eq=False)
class ChatBatch:
    """int64 [batch, seq_len] tensors of some rows."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor

    def as_batch(self) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """((input_ids, attention_mask, position_ids), labels): what the pipeline's data iterator yields."""
        return (self.input_ids, self.attention_mask, self.position_ids), self.labels


@dataclass(frozen=True, eq=False)
class ChatRows:
    """Training rows, built on demand from the kept conversations: row i holds conversations ``rows[i]``."""

    conversations: tuple[TokenizedConversation, ...]
    rows: tuple[tuple[int, ...], ...]  # indices into conversations, in the order they sit in the row
    seq_len: int
    pad_id: int
    packed: bool
    stats: ChatDataStats

    def __len__(self) -> int:
        return len(self.rows)

    def filled(self, index: int) -> int:
        """Conversation tokens in row ``index`` (the rest of its ``seq_len`` positions is padding)."""
        return sum(len(self.conversations[c]) for c in self.rows[index])

    def tensors(self, indices: Sequence[int] | np.ndarray) -> ChatBatch:
        """The rows ``indices``, stacked."""
        shape = (len(indices), self.seq_len)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long)
        attention = torch.ones(shape, dtype=torch.long)
        for b, index in enumerate(np.asarray(indices).tolist()):
            start = 0
            for c in self.rows[index]:
                conversation = self.conversations[c]
                end = start + len(conversation)
                ids = torch.from_numpy(conversation.input_ids.astype(np.int64))
                input_ids[b, start:end] = ids
                labels[b, start:end] = ids.masked_fill(~torch.from_numpy(conversation.supervised), IGNORE)
                labels[b, start] = IGNORE  # never a target of the conversation (or padding) before it
                positions[b, start:end] = torch.arange(end - start)
                start = end
            if self.packed:
                positions[b, start:] = torch.arange(self.seq_len - start)  # the padding tail: a segment of its own
            else:
                positions[b, start:] = torch.arange(start, self.seq_len)
                attention[b, start:] = 0
        return ChatBatch(input_ids, attention, positions, labels)

    def batch(self, indices: Sequence[int] | np.ndarray) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        return self.tensors(indices).as_batch()


def build_rows(
    conversations: Sequence[TokenizedConversation],
    *,
    seq_len: int,
    pad_id: int,
    packing: bool = True,
    truncation: str = "truncate",
) -> ChatRows:
    """Fit each conversation to seq_len (truncation: "truncate" keeps its first seq_len tokens, "drop" leaves it
    out), leave out those without a supervised token, and pack (or pad) the rest into rows."""
    if seq_len < 2:
        raise PptkError(f"seq_len must be at least 2 (a token and the one it predicts), got {seq_len}")
    if truncation not in TRUNCATION:
        raise PptkError(f"unknown truncation {truncation!r}; use one of {', '.join(TRUNCATION)}")
    kept: list[TokenizedConversation] = []
    left_out: list[str] = []  # where the conversations left out come from
    truncated = dropped = skipped = 0
    for given in conversations:
        conversation = given
        if len(conversation) > seq_len:
            if truncation == "drop":
                dropped += 1
                left_out.append(conversation.where)
                continue
            conversation = TokenizedConversation(
                conversation.input_ids[:seq_len], conversation.supervised[:seq_len], conversation.where
            )
            if conversation.supervised[1:].any():
                truncated += 1
        if not conversation.supervised[1:].any():  # a first token is never a target (see the module's docstring)
            skipped += 1
            left_out.append(conversation.where)
            continue
        kept.append(conversation)
    if not kept:
        raise PptkError(
            f"none of the {len(conversations)} conversations is left to train on ({dropped} longer than seq_len "
            f"{seq_len} and dropped, {skipped} without a supervised token within it): raise seq_len, or use "
            'truncation="truncate"'
        )
    lengths = [len(c) for c in kept]
    rows = pack_best_fit(lengths, seq_len=seq_len) if packing else [[i] for i in range(len(kept))]
    tokens = sum(lengths)
    stats = ChatDataStats(
        examples=len(conversations),
        skipped_no_supervised=skipped,
        truncated=truncated,
        dropped=dropped,
        rows=len(rows),
        tokens=tokens,
        padding_fraction=1 - tokens / (len(rows) * seq_len),
        supervised_tokens=sum(int(c.supervised[1:].sum()) for c in kept),
    )
    if left_out:
        log.warning(
            "%d of %d conversations left out (%d longer than seq_len %d and dropped, %d without a supervised token "
            "within it); the first: %s",
            skipped + dropped,
            len(conversations),
            dropped,
            seq_len,
            skipped,
            left_out[0],
        )
    return ChatRows(tuple(kept), tuple(tuple(r) for r in rows), seq_len, pad_id, packing, stats)


def pack_best_fit(lengths: Sequence[int], *, seq_len: int) -> list[list[int]]:
    """Best fit decreasing: longest first, each into the open row it fills most tightly (a new row if none fits).

    Deterministic (ties go to the earlier example and the earlier row); rows come out in the order they were opened,
    their items longest first.
    """
    over = [n for n in lengths if n > seq_len]
    if over:
        raise PptkError(f"a conversation of {over[0]} tokens does not fit seq_len {seq_len}; fit them first")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row), sorted
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[index]
        slot = bisect.bisect_left(free, (n, -1))
        if slot == len(free):
            rows.append([index])
            left, row = seq_len - n, len(rows) - 1
        else:
            space, row = free.pop(slot)
            rows[row].append(index)
            left = space - n
        if left > 0:
            bisect.insort(free, (left, row))
    return rows


def pad_id_of(tokenizer: Any) -> int:
    """The id written into padding positions: pad, else eos, else 0 (no label and no attention ever reads it)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0
