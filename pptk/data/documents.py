# Pretraining inputs read as a stream of documents: .txt, .jsonl / .jsonl.gz and .parquet, never a whole file at once.
"""Each reader yields ``Piece(text, ends_document)``. A document longer than ``CHUNK_CHARS`` arrives as several
pieces cut at line ends (a one-document .txt file of gigabytes never sits in memory whole); the tokenizer sees the
pieces separately, and the document's end-of-text token follows its last piece.

Every problem names the file (and line or row): a missing or unreadable file, binary content, bad UTF-8 or JSON,
a missing text field or one of another type (with the type found), a file without a single non-blank document.
Null values in a Parquet text column are skipped (Parquet's missing value); a JSON null is an error.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pptk.data.describe import json_preview, json_type
from pptk.errors import PptkError

CHUNK_CHARS = 1 << 20  # pieces of a long document are about this long (cut at a line end)
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


@dataclass(frozen=True)
class Piece:
    text: str
    ends_document: bool


def input_kind(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".jsonl.gz", ".jsonl", ".parquet", ".txt"):
        if name.endswith(suffix):
            return suffix
    raise PptkError(
        f"{str(path)!r}: unknown input type; pptk data prepare reads {', '.join(SUFFIXES)} "
        "(rename plain text files to .txt)"
    )


def check_inputs(paths: Sequence[Path]) -> None:
    """Existence, readability, a known type and no binary content: the cheap checks, before any tokenizing."""
    if not paths:
        raise PptkError("no input files given; pass at least one .txt, .jsonl, .jsonl.gz or .parquet file")
    for path in paths:
        if not path.is_file():
            raise PptkError(f"input {str(path)!r} does not exist or is not a file; check the path")
        kind = input_kind(path)
        try:
            with open(path, "rb") as f:
                head = f.read(8192)
        except OSError as err:
            raise PptkError(f"input {str(path)!r} cannot be read ({err.strerror}); check its permissions") from None
        if not head:
            raise PptkError(f"input {str(path)!r} is empty; remove it from the list or fill it")
        if kind in (".txt", ".jsonl") and b"\0" in head:
            raise PptkError(f"input {str(path)!r} is binary, not UTF-8 text; remove it from the inputs")


def read_documents(path: Path, *, text_field: str = "text", lines_are_documents: bool = False) -> Iterator[Piece]:
    """The documents of one input file as pieces; raises a PptkError naming the file if it holds none."""
    kind = input_kind(path)
    if kind == ".parquet":
        pieces = _parquet(path, text_field)
    elif kind == ".txt":
        pieces = _text_lines(path) if lines_are_documents else _text_file(path)
    else:
        pieces = _jsonl(path, text_field)
    found = False
    for piece in pieces:
        found = found or piece.ends_document
        yield piece
    if not found:
        raise PptkError(f"input {str(path)!r} holds no non-blank document; remove it from the list or fill it")


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    number = 0
    try:
        gz = path.name.lower().endswith(".gz")
        with (
            gzip.open(path, "rt", encoding="utf-8", newline="") if gz else open(path, encoding="utf-8", newline="") as f
        ):
            for number, line in enumerate(f, 1):
                if "\0" in line:
                    raise PptkError(f"input {str(path)!r} line {number} holds binary data; remove it from the inputs")
                yield number, line
    except UnicodeDecodeError:
        raise PptkError(f"input {str(path)!r} is not UTF-8 text (near line {number + 1}); convert it") from None
    except (OSError, EOFError) as err:
        raise PptkError(f"input {str(path)!r} cannot be read ({err}); check the file") from None


def _text_file(path: Path) -> Iterator[Piece]:
    # One document per file, passed on in pieces of about CHUNK_CHARS cut after a newline.
    buffer: list[str] = []
    size = 0
    any_text = False
    for _, line in _decoded_lines(path):
        buffer.append(line)
        size += len(line)
        any_text = any_text or bool(line.strip())
        if size >= CHUNK_CHARS:
            yield Piece("".join(buffer), False)
            buffer, size = [], 0
    if any_text:
        yield Piece("".join(buffer), True)


def _text_lines(path: Path) -> Iterator[Piece]:
    for _, line in _decoded_lines(path):
        text = line.strip()
        if text:
            yield Piece(text, True)


def _jsonl(path: Path, text_field: str) -> Iterator[Piece]:
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PptkError(f"input {str(path)!r} line {number} is not JSON ({err.msg}); fix or remove it") from None
        if not isinstance(record, dict):
            raise PptkError(
                f"input {str(path)!r} line {number} is a JSON {json_type(record)}, not an object with a field "
                f'{text_field!r}; .jsonl wants one object per line, such as {{"{text_field}": "..."}}'
            )
        if text_field not in record:
            raise PptkError(
                f"input {str(path)!r} line {number} has no field {text_field!r} (it has: "
                f"{', '.join(record) or 'none'}); pass --text-field NAME"
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise PptkError(
                f"input {str(path)!r} line {number}: field {text_field!r} holds a JSON {json_type(text)} "
                f"({json_preview(text)}), not a string; store the document's text there as a string, or pass "
                "--text-field NAME of the field that holds it"
            )
        if text.strip():
            yield Piece(text, True)


def _parquet(path: Path, text_field: str) -> Iterator[Piece]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise PptkError(f"input {str(path)!r} is not a readable Parquet file ({err}); check the file") from None
    schema = parquet.schema_arrow
    text_columns = [field.name for field in schema if _is_text(field.type)]
    if text_field not in schema.names:
        raise PptkError(
            f"input {str(path)!r} has no column {text_field!r} (it has: {', '.join(schema.names)}); pass "
            f"--text-field NAME{_text_columns_hint(text_columns)}"
        )
    column_type = schema.field(text_field).type
    if not _is_text(column_type):
        raise PptkError(
            f"input {str(path)!r}: column {text_field!r} has type {column_type}, not text (string); pass "
            f"--text-field NAME of a string column{_text_columns_hint(text_columns)}"
        )
    # Record batches stream the column a row group at a time.
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield Piece(text, True)


def _is_text(arrow_type) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        return _is_text(arrow_type.value_type)
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type)


def _text_columns_hint(text_columns: list[str]) -> str:
    return f" (its string columns: {', '.join(text_columns)})" if text_columns else " (it has no string column)"
