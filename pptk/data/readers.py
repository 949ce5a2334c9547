# Fine-tuning data readers: CSV/TSV/JSONL (text, label) rows, CoNLL tagged sentences, text lines; file:line kept.
from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pptk.data.describe import json_preview, json_type
from pptk.errors import PptkError

IOB_TAG = re.compile(r"^(O|[BIES]-\S+)$")
DOCSTART = "-DOCSTART-"


@dataclass(frozen=True)
class TextExample:
    text: str
    label: str
    where: str  # "file:line"
    text_pair: str | None = None


@dataclass(frozen=True)
class TaggedSentence:
    words: tuple[str, ...]
    tags: tuple[str, ...]
    where: str  # "file:line" of the first word


# ---------------------------------------------------------------------------------------------------- readers


@contextmanager
def _utf8(path: Path) -> Iterator[None]:
    """A binary or non-UTF-8 file is one error naming it (not a UnicodeDecodeError that does not)."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise PptkError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); is it a binary file? Save it as UTF-8 text"
        ) from None


def read_text_classification(
    path: str | Path, *, text_column: str = "text", label_column: str = "label", text_pair_column: str | None = None
) -> list[TextExample]:
    """Rows of a .csv/.tsv (header line first) or .jsonl (one object per line) file."""
    path = Path(path)
    if not path.is_file():
        raise PptkError(f"data file {path} does not exist; check the path")
    columns = [c for c in (text_column, text_pair_column, label_column) if c]
    if path.suffix in (".csv", ".tsv"):
        rows = _csv_rows(path, columns)
    elif path.suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path, columns)
    else:
        raise PptkError(f"{path}: unknown format {path.suffix!r}; use .csv, .tsv (with a header line) or .jsonl")
    examples = []
    with _utf8(path):
        for where, row in rows:
            text = _text(row, text_column, where)
            pair = _text(row, text_pair_column, where) if text_pair_column else None
            label = _label(row, label_column, where)
            examples.append(TextExample(text, label, where, pair))
    if not examples:
        raise PptkError(f"{path} has no examples; fill it or point to another file")
    return examples


def _csv_rows(path: Path, columns: list[str]) -> Iterator[tuple[str, dict]]:
    with path.open(newline="", encoding="utf-8") as f:
        delimiter, other = ("\t", ",") if path.suffix == ".tsv" else (",", "\t")
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            hint = (
                f" (one column: are its fields separated by {other!r}? A {path.suffix} file separates them by "
                f"{delimiter!r}; rename it .{'csv' if other == ',' else 'tsv'})"
                if len(header) == 1 and other in header[0]
                else ""
            )
            raise PptkError(
                f"{path}:1: no column {', '.join(map(repr, missing))} in the header {header}{hint}; pass "
                "--text-column / --label-column / --text-pair-column with the names this file uses"
            )
        for row in reader:
            where = f"{path}:{reader.line_num}"
            # A row of another width would shift the fields silently: a text's unquoted delimiter makes the rest
            # of it the label.
            extra, short = row.get(None) or [], sum(row[c] is None for c in header)
            if extra or short:
                fields = len(header) + len(extra) - short
                raise PptkError(
                    f"{where}: the row has {fields} field{'s' * (fields != 1)}, the header {len(header)}; put a text "
                    f"that holds {delimiter!r} or a line break in double quotes"
                )
            yield where, row


def _jsonl_rows(path: Path, columns: list[str]) -> Iterator[tuple[str, dict]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PptkError(f"{where}: not a JSON object ({err.msg}); .jsonl wants one object per line") from None
            if not isinstance(row, dict):
                hint = " (a .json file holding one array converts with: jq -c '.[]' in.json > out.jsonl)"
                raise PptkError(
                    f"{where}: expected a JSON object, got a JSON {json_type(row)}; .jsonl wants one object per line"
                    + (hint if isinstance(row, list) else "")
                )
            missing = [c for c in columns if c not in row]
            if missing:
                raise PptkError(
                    f"{where}: no key {', '.join(map(repr, missing))} (keys: {sorted(row)}); pass "
                    "--text-column / --label-column / --text-pair-column with the names this file uses"
                )
            yield where, row


def _text(row: dict, column: str, where: str) -> str:
    value = row.get(column)
    if isinstance(value, str) and value.strip():
        return value.strip()
    if value is None or isinstance(value, str):
        raise PptkError(f"{where}: empty {column!r}; every example needs a text and a label")
    raise PptkError(
        f"{where}: {column!r} holds a JSON {json_type(value)} ({json_preview(value)}), not a string; write the text "
        "as a JSON string, or pass --text-column / --text-pair-column naming the key that holds it"
    )


def _label(row: dict, column: str, where: str) -> str:
    """A class label as a string: strings and integers as written (JSON true/false as True/False), a whole float
    as its integer, so 1 and 1.0 are one class."""
    value = row.get(column)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, str)) and str(value).strip():
        return str(value).strip()
    if value is None or isinstance(value, str):
        raise PptkError(f"{where}: empty {column!r}; every example needs a text and a label")
    what = "a non-integer number" if isinstance(value, float) else f"a JSON {json_type(value)}"
    raise PptkError(
        f"{where}: label {column!r} is {what} ({json_preview(value)}), not a class; classification labels are "
        "strings or integers (a score to regress is not supported); fix the data, or pass --label-column naming the "
        "key that holds the classes"
    )


def read_conll(path: str | Path) -> list[TaggedSentence]:
    """CoNLL: one ``token tag`` per line (extra columns between them, as in CoNLL-2003, are ignored: the tag is the
    last column), a blank line between sentences, ``-DOCSTART-`` lines skipped. Tags are IOB: O, B-X, I-X."""
    path = Path(path)
    if not path.is_file():
        raise PptkError(f"data file {path} does not exist; check the path")
    sentences: list[TaggedSentence] = []
    words: list[str] = []
    tags: list[str] = []
    start = ""
    with _utf8(path), path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0] == DOCSTART:
                if words:
                    sentences.append(TaggedSentence(tuple(words), tuple(tags), start))
                words, tags = [], []
                continue
            where = f"{path}:{number}"
            if len(fields) < 2:
                raise PptkError(
                    f"{where}: malformed CoNLL line {line.strip()!r}: expected 'token tag' (whitespace "
                    "separated), or a blank line between sentences"
                )
            if not IOB_TAG.match(fields[-1]):
                raise PptkError(
                    f"{where}: tag {fields[-1]!r} is not an IOB tag (O, B-TYPE, I-TYPE); the tag is read from each "
                    "line's last column: move it there, or convert the file to IOB tags"
                )
            if not words:
                start = where
            words.append(fields[0])
            tags.append(fields[-1])
    if words:
        sentences.append(TaggedSentence(tuple(words), tuple(tags), start))
    if not sentences:
        raise PptkError(f"{path} has no sentences; fill it or point to another file")
    return sentences


def read_lines(paths: Sequence[str | Path]) -> list[tuple[str, str]]:
    """(text, "file:line") for every non-empty line of UTF-8 text files: one masked-LM example per line."""
    if not paths:
        raise PptkError("no text files given; pass at least one path")
    lines = []
    for path in map(Path, paths):
        if not path.is_file():
            raise PptkError(f"text file {path} does not exist; check the path")
        with _utf8(path), path.open(encoding="utf-8") as f:
            lines += [(line.strip(), f"{path}:{n}") for n, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise PptkError(f"no text in {', '.join(map(str, paths))}; every non-empty line is an example")
    return lines
