# Does a token set fit the run's tokenizer and model when no record says so? Sampled ids, documents' last tokens.
"""A Megatron set made elsewhere records no tokenizer and no largest id, and reading every token of a terabyte
corpus at each start is not an option. What is checked instead, reading about a megabyte:

- its dtype can hold the tokenizer's ids (a uint16 set was not made by a 128k-token tokenizer);
- the ids of 16 windows of 64k tokens spread over the file are in [0, the model's vocab_size) and below the
  tokenizer's size;
- sampled documents (8 windows of 16, first and last included) end with the tokenizer's eos, as pptk separates
  documents by eos (document masking, the labels) and Megatron-LM's ``preprocess_data.py --append-eod`` writes it.

A set of another tokenizer that shares the vocabulary size and the eos id passes: only a record can tell those
apart, which sets pptk prepares (either format) carry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pptk.data.megatron import DocumentOffsets, spread
from pptk.errors import PptkError

if TYPE_CHECKING:
    from pptk.data.blocks import PreparedSet

TOKEN_WINDOWS, TOKEN_WINDOW = 16, 1 << 16
DOCUMENT_WINDOWS, DOCUMENT_WINDOW = 8, 16


def read_span(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    """array[start:stop], read through the file of a whole ``np.memmap`` rather than its mapping: a mapped page of a
    large file can bring a 2 MiB folio into the process's memory, a read only what it asked for."""
    filename = getattr(array, "filename", None)
    if filename is None:
        return np.asarray(array[start:stop])
    begin = int(getattr(array, "offset", 0)) + start * array.itemsize
    return np.fromfile(filename, dtype=array.dtype, count=stop - start, offset=begin)


def sampled_token_range(tokens: np.ndarray) -> tuple[int, int, int]:
    """(smallest id, largest id, tokens looked at) over windows of the token array."""
    windows = [read_span(tokens, w.start, w.stop) for w in spread(len(tokens), TOKEN_WINDOWS, TOKEN_WINDOW)]
    return min(int(w.min()) for w in windows), max(int(w.max()) for w in windows), sum(len(w) for w in windows)


def sampled_document_ends(prepared: PreparedSet) -> dict[int, int]:
    """{document: its last token id} for non-empty documents of windows spread over the set."""
    ends: dict[int, int] = {}
    for window in spread(prepared.num_documents, DOCUMENT_WINDOWS, DOCUMENT_WINDOW):
        if isinstance(prepared.offsets, DocumentOffsets):
            offsets = prepared.offsets.window(window.start, window.stop + 1)
        else:
            offsets = read_span(prepared.offsets, window.start, window.stop + 1)
        for i, document in enumerate(range(window.start, window.stop)):
            if offsets[i + 1] > offsets[i]:
                ends[document] = int(read_span(prepared.tokens, int(offsets[i + 1]) - 1, int(offsets[i + 1]))[0])
    return ends


def check_foreign(prepared: PreparedSet, *, tokenizer_info: dict, vocab_size: int) -> None:
    """The checks above, each failure one PptkError naming the set's value and the tokenizer's or model's."""
    where = f"Megatron set {str(prepared.path)!r}"
    tokenizer = f"tokenizer {tokenizer_info['name']!r}"
    size = tokenizer_info["vocab_size"]
    dtype = prepared.tokens.dtype
    capacity = int(np.iinfo(dtype).max) + 1
    if size > capacity:
        raise PptkError(
            f"{where} stores token ids as {dtype} (at most {capacity - 1}), but {tokenizer} has {size:,} tokens: "
            "the set was made with another tokenizer; pass the one it was made with (--tokenizer)"
        )
    low, high, seen = sampled_token_range(prepared.tokens)
    sampled = f"(in {seen:,} sampled of its {len(prepared.tokens):,} tokens)"
    if low < 0:
        raise PptkError(f"{where} holds token id {low} {sampled}: ids are never negative; the set is damaged")
    if high >= vocab_size:
        raise PptkError(
            f"{where} holds token id {high} {sampled} but the model's vocab_size is {vocab_size}; use the "
            "model the set was made for, or resize the model's embeddings"
        )
    if high >= size:
        raise PptkError(
            f"{where} holds token id {high} {sampled}, beyond the {size:,} tokens of {tokenizer}: the set was made "
            "with another tokenizer; pass the one it was made with (--tokenizer)"
        )
    ends = sampled_document_ends(prepared)
    eos = tokenizer_info["eos_id"]
    wrong = {d: t for d, t in ends.items() if t != eos}
    if wrong:
        shown = ", ".join(f"document {d} ends with {t}" for d, t in list(wrong.items())[:3])
        raise PptkError(
            f"{where}: {len(wrong)} of {len(ends)} sampled documents do not end with the eos id {eos} of {tokenizer} "
            f"({shown}); pptk separates documents by eos: prepare the set with the model's tokenizer and an eos "
            "after every document (Megatron-LM's preprocess_data.py --append-eod, or `pptk data prepare --format "
            "megatron`), or pass the tokenizer it was made with"
        )
