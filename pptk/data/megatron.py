# Megatron-LM's indexed datasets (PREFIX.bin + PREFIX.idx): found, checked and read; and their index written.
"""The .idx layout, as Megatron-LM's ``megatron/core/datasets/indexed_dataset.py`` reads and writes it (the layout
Megatron-DeepSpeed's and gpt-neox's ``MMapIndexedDataset`` use too)::

    9 bytes   b"MMIDIDX\\x00\\x00"
    8         version: little-endian uint64, 1
    1         dtype code of the .bin: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    8         S: the number of sequences
    8         D: the number of document index entries (documents + 1)
    4 S       int32: the length of each sequence, in tokens
    8 S       int64: the byte offset of each sequence in the .bin
    8 D       int64: the document index, document d is sequences [idx[d], idx[d + 1]); idx[0] = 0, idx[-1] = S
   (1 S       int8: a mode per sequence, in multimodal sets only; pptk refuses those)

Megatron's writers put the sequences back to back, so the .bin reads as one token stream, as pptk's tokens.bin:
document d is the tokens from its first sequence's offset to the next document's. Nothing here reads a whole
array: the checks read 16 windows spread over each one, so a rank's memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pptk.errors import PptkError
from pptk.logs import get_logger

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34  # magic, version, dtype code, S, D
# Megatron's DType codes. 6 and 7 (float64, float32) exist in its enum but hold no token ids.
DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 8: "uint16"}
CODES = {name: code for code, name in DTYPES.items()}
WINDOWS, WINDOW = 16, 4096  # the sampled checks: 16 runs of 4096 entries, everything when that covers it
CHUNK = 1 << 20  # entries written at once

_log = get_logger(__name__)


def token_dtype(vocab_size: int) -> str:
    """What pptk writes: uint16 when the vocabulary fits, else int32 (Megatron has no uint32 code)."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def megatron_prefix(path: str | Path) -> Path | None:
    """The prefix when ``path`` names a Megatron set (PREFIX, PREFIX.bin or PREFIX.idx, either file present)."""
    text = str(path)
    if text.endswith((".bin", ".idx")) and not Path(text).is_dir():
        text = text[:-4]
    prefix = Path(text)
    if prefix.is_dir() or not (bin_path(prefix).is_file() or idx_path(prefix).is_file()):
        return None
    return prefix


def bin_path(prefix: Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: Path) -> Path:
    return Path(f"{prefix}.idx")


@dataclass(frozen=True, eq=False)
class MegatronIndex:
    """A checked .idx, read a window at a time through the file (``np.fromfile``), never mapped: a mapped page of a
    large file can bring a 2 MiB folio into the process's memory, a read brings only what it asked for."""

    path: Path
    dtype: np.dtype  # of the .bin
    num_sequences: int
    num_documents: int
    num_tokens: int = 0  # from the last sequence's offset and length; set by read_index

    def lengths(self, start: int, stop: int) -> np.ndarray:
        return self._read(HEADER_BYTES, np.int32, start, min(stop, self.num_sequences))

    def pointers(self, start: int, stop: int) -> np.ndarray:
        return self._read(HEADER_BYTES + 4 * self.num_sequences, np.int64, start, min(stop, self.num_sequences))

    def documents(self, start: int, stop: int) -> np.ndarray:
        """Entries [start, stop) of the document index (num_documents + 1 entries)."""
        return self._read(HEADER_BYTES + 12 * self.num_sequences, np.int64, start, min(stop, self.num_documents + 1))

    def _read(self, base: int, dtype: type, start: int, stop: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        return np.fromfile(self.path, dtype=dtype, count=max(stop - start, 0), offset=base + start * size)


def read_index(path: Path) -> MegatronIndex:
    """Open a .idx after checking its header, its size and windows of its arrays; one PptkError naming the problem."""
    where = f"Megatron index {str(path)!r}"
    if not path.is_file():
        raise PptkError(f"{where} does not exist; a Megatron set is PREFIX.bin with PREFIX.idx beside it")
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if not (header.startswith(MAGIC) or MAGIC.startswith(header)):
        raise PptkError(
            f"{where} does not start with Megatron's magic {MAGIC!r} (it starts with {header[:9]!r}): not a Megatron "
            "indexed dataset; give the prefix of a .bin/.idx pair written by Megatron-LM's preprocess_data.py (or "
            "`pptk data prepare --format megatron`)"
        )
    if len(header) < HEADER_BYTES:
        raise PptkError(f"{where} is {size} bytes, shorter than its {HEADER_BYTES}-byte header: truncated; copy it")
    version, code, sequences, entries = struct.unpack("<QBQQ", header[len(MAGIC) :])
    if version != VERSION:
        raise PptkError(f"{where} has format version {version}; pptk reads version {VERSION}, Megatron-LM's")
    if code not in DTYPES:
        raise PptkError(
            f"{where} has dtype code {code}; token ids are stored as one of {DTYPES} (codes 6 and 7 are floats)"
        )
    expected = HEADER_BYTES + 12 * sequences + 8 * entries
    what = f"its header says {sequences:,} sequences and {max(entries - 1, 0):,} documents, {expected:,} bytes"
    if size < expected:
        raise PptkError(f"{where} is {size:,} bytes but {what}: truncated; copy it again or prepare the set again")
    if size == expected + sequences and sequences:
        raise PptkError(f"{where} has a mode per sequence (a multimodal set); pptk trains on text token sets only")
    if size != expected:
        raise PptkError(f"{where} is {size:,} bytes but {what}: not a Megatron index, or a damaged one")
    if sequences == 0 or entries < 2:
        raise PptkError(f"{where} holds no documents ({what}); give a set with text in it")
    index = MegatronIndex(path, np.dtype(DTYPES[code]), sequences, entries - 1)
    last = sequences - 1
    tokens = int(index.pointers(last, sequences)[0]) // index.dtype.itemsize + int(index.lengths(last, sequences)[0])
    index = replace(index, num_tokens=tokens)
    problem = _array_problem(index)
    if problem:
        raise PptkError(f"{where}: {problem}; the index is damaged or not Megatron's: prepare the set again")
    return index


def spread(n: int, windows: int = WINDOWS, width: int = WINDOW) -> list[slice]:
    """``windows`` runs of ``width`` positions spread evenly over [0, n), first and last included; all when short."""
    if n <= windows * width:
        return [slice(0, n)]
    return [slice(s, s + width) for s in (i * (n - width) // (windows - 1) for i in range(windows))]


def _array_problem(index: MegatronIndex) -> str | None:
    """Windows of the arrays: documents rise from 0 to S; each sequence starts where the one before it ends."""
    sequences, entries = index.num_sequences, index.num_documents + 1
    first, last = int(index.documents(0, 1)[0]), int(index.documents(entries - 1, entries)[0])
    if (first, last) != (0, sequences):
        return f"its document index runs from {first} to {last}, not from 0 to {sequences}"
    if int(index.pointers(0, 1)[0]) != 0:
        return f"its first sequence starts at byte {int(index.pointers(0, 1)[0])}, not 0"
    itemsize = index.dtype.itemsize
    for window in spread(entries):
        if np.any(np.diff(index.documents(window.start, window.stop)) < 0):
            return f"its document index falls somewhere in entries [{window.start}, {window.stop})"
    for window in spread(sequences):
        lengths = index.lengths(window.start, window.stop).astype(np.int64)
        pointers = index.pointers(window.start, window.stop)
        if np.any(lengths < 0):
            return f"a sequence in [{window.start}, {window.stop}) has a negative length"
        gaps = np.flatnonzero(pointers[1:] != pointers[:-1] + lengths[:-1] * itemsize)
        if gaps.size:
            at = window.start + int(gaps[0]) + 1
            return (
                f"sequence {at} starts at byte {int(pointers[at - window.start])}, not where sequence {at - 1} ends; "
                "pptk reads a Megatron set as one token stream, written back to back as Megatron's builder writes it"
            )
    return None


@dataclass(frozen=True, eq=False)
class DocumentOffsets:
    """Document d is tokens[offsets[d]:offsets[d + 1]], each offset computed from the index when asked: an array of
    them would cost every rank 8 bytes per document."""

    index: MegatronIndex

    def __len__(self) -> int:
        return self.index.num_documents + 1

    def __getitem__(self, document: int) -> int:
        document = range(len(self))[document]  # negative and out-of-range indices as a list's
        first = int(self.index.documents(document, document + 1)[0])
        if first == self.index.num_sequences:
            return self.index.num_tokens
        return int(self.index.pointers(first, first + 1)[0]) // self.index.dtype.itemsize

    def window(self, start: int, stop: int) -> np.ndarray:
        """offsets[start:stop] in one read of each array."""
        firsts = self.index.documents(start, stop)
        inside = firsts < self.index.num_sequences
        out = np.full(len(firsts), self.index.num_tokens, dtype=np.int64)
        if inside.any():
            low, high = int(firsts[inside].min()), int(firsts[inside].max()) + 1
            out[inside] = self.index.pointers(low, high)[firsts[inside] - low] // self.index.dtype.itemsize
        return out


def open_tokens(prefix: Path, index: MegatronIndex) -> np.memmap:
    """Map PREFIX.bin as the index's dtype; a .bin shorter than the index says is refused, a longer one named."""
    path = bin_path(prefix)
    if not path.is_file():
        raise PptkError(f"Megatron set {str(prefix)!r} has {idx_path(prefix).name} but no {path.name}; copy it too")
    size, needed = path.stat().st_size, index.num_tokens * index.dtype.itemsize
    if size < needed:
        raise PptkError(
            f"{str(path)!r} is {size:,} bytes, but its index describes {index.num_tokens:,} {index.dtype} tokens "
            f"({needed:,} bytes): truncated, or the .idx belongs to another .bin; copy both files again"
        )
    if size > needed:
        _log.warning(f"{str(path)!r} is {size - needed:,} bytes longer than its index describes; reading what it lists")
    return np.memmap(path, dtype=index.dtype, mode="r", shape=(index.num_tokens,))


def index_problem(prefix: Path) -> str | None:
    """What is wrong with a Megatron set's files (its index and its .bin's size); None when nothing is found."""
    try:
        open_tokens(prefix, read_index(idx_path(prefix)))
    except PptkError as err:
        return str(err)
    return None


def write_index(path: Path, offsets: np.ndarray, dtype: str) -> str:
    """Write a .idx of one sequence per document from document token offsets (int64, documents + 1), a chunk at a
    time; returns the SHA-256 of what it wrote."""
    documents = len(offsets) - 1
    itemsize = np.dtype(dtype).itemsize
    digest = hashlib.sha256()
    with open(path, "wb") as f:

        def put(data: bytes) -> None:
            f.write(data)
            digest.update(data)

        put(MAGIC + struct.pack("<QBQQ", VERSION, CODES[dtype], documents, documents + 1))
        for start in range(0, documents, CHUNK):  # sequence lengths
            lengths = np.diff(np.asarray(offsets[start : start + CHUNK + 1], dtype=np.int64))
            if lengths.size and int(lengths.max()) >= 1 << 31:
                raise PptkError(
                    f"a document of {int(lengths.max()):,} tokens is longer than Megatron's int32 sequence lengths "
                    "hold; split it (one document per line: --lines-are-documents)"
                )
            put(lengths.astype(np.int32).tobytes())
        for start in range(0, documents, CHUNK):  # byte offsets
            put((np.asarray(offsets[start : min(start + CHUNK, documents)], dtype=np.int64) * itemsize).tobytes())
        for start in range(0, documents + 1, CHUNK):  # the document index: sequence d is document d
            put(np.arange(start, min(start + CHUNK, documents + 1), dtype=np.int64).tobytes())
        f.flush()
        os.fsync(f.fileno())  # the set is renamed into place next: its bytes must be on disk first
    return digest.hexdigest()
