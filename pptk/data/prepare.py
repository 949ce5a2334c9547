# `pptk data prepare`: tokenize a corpus once into a memory-mappable token file, a document index and a manifest.
"""A prepared set is a directory::

    tokens.bin      every document's token ids followed by the separator (eos), back to back;
                    uint16 when the tokenizer's vocabulary fits, else uint32
    documents.idx   int64 offsets into tokens.bin: document d is tokens[idx[d]:idx[d + 1]] (its eos included)
    manifest.json   format version, dtype, counts, the largest token id, the checksums of both files (full and
                    sampled, see pptk.data.integrity), the tokenizer (name, content hash, eos id, size) and the
                    source: input files with sizes and mtimes and the reading options

Raw little-endian arrays: ``np.memmap`` reads them without copying, and a block is one slice. With
``layout="megatron"`` (``--format megatron``) the directory holds ``tokens.bin`` (uint16, or int32 past 65,536
tokens) and ``tokens.idx``, Megatron-LM's indexed dataset of one sequence per document (pptk.data.megatron), so
Megatron-LM trains on it with ``--data-path OUT/tokens``; the manifest beside them says ``"layout": "megatron"``.

The directory appears whole: it is written as ``OUT.partial-HOST-PID``, synced and renamed; a later prepare
removes the partial directories of this host's processes that no longer run (a ``kill -9`` leaves one).
Preparing again with an unchanged source (same files, sizes, mtimes, tokenizer and options) checks every byte
against the manifest's checksums and is a no-op when they match; a damaged set, or one too old to have checksums,
is prepared again, with a line saying why. Several processes may prepare the same set at once (every rank of a run
given text files does): the first rename wins, the rest are dropped.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pptk.data.documents import Piece, check_inputs, read_documents
from pptk.data.integrity import file_checksums, find_damage
from pptk.data.megatron import token_dtype as megatron_dtype
from pptk.data.megatron import write_index
from pptk.data.workers import backend_tokenizer, encode, encode_in_workers
from pptk.errors import PptkError
from pptk.logs import get_logger

FORMAT = 1
TOKENS_FILE = "tokens.bin"
INDEX_FILE = "documents.idx"
MEGATRON_INDEX_FILE = "tokens.idx"  # beside tokens.bin: Megatron opens the pair by the prefix OUT/tokens
LAYOUTS = ("pptk", "megatron")
MANIFEST_FILE = "manifest.json"
BATCH_CHARS = 1 << 20  # text handed to a worker at once

_log = get_logger(__name__)


@dataclass(frozen=True)
class Prepared:
    path: Path
    manifest: dict
    reused: bool  # True when an up-to-date set was already there


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object, or a directory to load one from with transformers."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        if not Path(tokenizer).is_dir():
            raise PptkError(f"--tokenizer {str(tokenizer)!r} is not a directory; give a Hugging Face tokenizer dir")
        try:
            return AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as err:
            raise PptkError(f"--tokenizer {str(tokenizer)!r} holds no loadable tokenizer ({err})") from None
    return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> dict:
    """Name, content hash, separator id and size of a fast tokenizer; the hash ignores where it was loaded from."""
    if not getattr(tokenizer, "is_fast", False):
        raise PptkError(
            f"tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer; prepare needs one "
            "(a directory with tokenizer.json)"
        )
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if separator is None:
        raise PptkError(
            f"tokenizer {tokenizer.name_or_path!r} has neither an eos nor a sep token, so documents cannot be "
            "separated; set one (tokenizer.eos_token = ...) and save it"
        )
    # Truncation and padding are call settings, not the tokenization: transformers changes them on the backend
    # whenever it is called with truncation=True or padding, so they must not change the hash.
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    content = backend.to_str()
    return {
        "name": str(tokenizer.name_or_path),
        "hash": hashlib.sha256(content.encode()).hexdigest(),
        "eos_id": int(separator),
        "vocab_size": len(tokenizer),
    }


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def prepare_files(
    inputs: Sequence[str | Path],
    *,
    tokenizer: Any,
    out: str | Path,
    workers: int = 1,
    text_field: str = "text",
    lines_are_documents: bool = False,
    progress: bool = False,
    layout: str = "pptk",
) -> Prepared:
    """Tokenize input files into the prepared set ``out`` (or reuse it when its source is unchanged).

    layout: "pptk" (tokens.bin + documents.idx) or "megatron" (tokens.bin + tokens.idx, Megatron-LM's format).
    """
    if workers < 1:
        raise PptkError(f"--workers must be at least 1, got {workers}")
    if layout not in LAYOUTS:
        raise PptkError(f"--format must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    paths = [Path(p).resolve() for p in inputs]
    check_inputs(paths)
    tokenizer = load_tokenizer(tokenizer)
    info = tokenizer_fingerprint(tokenizer)
    source = {
        "format": FORMAT,
        "tokenizer_hash": info["hash"],
        "options": {"text_field": text_field, "lines_are_documents": lines_are_documents},
        "inputs": [{"path": str(p), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in paths],
    }
    if layout != "pptk":  # only then: the sets prepared before layouts existed stay up to date
        source["layout"] = layout

    def pieces() -> Iterator[Piece]:
        for path in paths:
            yield from read_documents(path, text_field=text_field, lines_are_documents=lines_are_documents)

    total = sum(entry["size"] for entry in source["inputs"])
    return _prepare(
        Path(out), source, info, tokenizer, pieces(), workers=workers, progress_total=total if progress else None
    )


def prepare_documents(documents: Sequence[str], *, tokenizer: Any, out: str | Path, name: str) -> Prepared:
    """A prepared set of documents held in memory (the embedded demo), one worker; reused while they are unchanged."""
    tokenizer = load_tokenizer(tokenizer)
    info = tokenizer_fingerprint(tokenizer)
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.encode())
        digest.update(b"\0")
    source = {
        "format": FORMAT,
        "tokenizer_hash": info["hash"],
        "options": {},
        "inputs": [{"name": name, "documents": len(documents), "sha256": digest.hexdigest()}],
    }
    pieces = (Piece(doc, True) for doc in documents if doc.strip())
    return _prepare(Path(out), source, info, tokenizer, pieces, workers=1, progress_total=None)


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None


def _prepare(
    out: Path, source: dict, info: dict, tokenizer: Any, pieces: Iterable[Piece], *, workers: int, progress_total
) -> Prepared:
    layout = source.get("layout", "pptk")
    remove_leftovers(out)
    existing = read_manifest(out) if out.exists() else None
    if out.exists() and existing is None:
        raise PptkError(
            f"{str(out)!r} exists and is not a prepared set (no readable {MANIFEST_FILE}); choose another --out "
            "or remove it"
        )
    if existing is not None and existing.get("source") == source:
        # The same check as training's and more: sizes, offsets and every byte against the recorded checksums.
        damage = find_damage(out, existing, full=True)
        if damage is None:
            return Prepared(out, existing, reused=True)
        _log.warning(f"prepared set {str(out)!r}: {damage}; preparing it again")
    partial = out.with_name(f"{out.name}.partial-{_owner()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        dtype = megatron_dtype(info["vocab_size"]) if layout == "megatron" else token_dtype(info["vocab_size"])
        counts = _write_tokens(
            partial, pieces, tokenizer, info, dtype=dtype, workers=workers, progress_total=progress_total
        )
        if layout == "megatron":
            _to_megatron_index(partial, counts, dtype)
        manifest = {
            "format": FORMAT,
            "layout": layout,
            "tokens_file": TOKENS_FILE,
            "index_file": MEGATRON_INDEX_FILE if layout == "megatron" else INDEX_FILE,
            "dtype": dtype,
            **counts,
            "tokenizer": info,
            "source": source,
        }
        with open(partial / MANIFEST_FILE, "w") as f:
            f.write(json.dumps(manifest, indent=1))
            _sync(f)
        return Prepared(_publish(partial, out, manifest), manifest, reused=False)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _to_megatron_index(directory: Path, counts: dict, dtype: str) -> None:
    """Replace documents.idx (int64 offsets, written as the tokens streamed by) with Megatron's tokens.idx."""
    offsets_file = directory / INDEX_FILE
    offsets = np.memmap(offsets_file, dtype=np.int64, mode="r", shape=(counts["num_documents"] + 1,))
    digest = write_index(directory / MEGATRON_INDEX_FILE, offsets, dtype)
    del offsets
    offsets_file.unlink()
    checksums = counts["checksums"]
    del checksums[INDEX_FILE]
    checksums[MEGATRON_INDEX_FILE] = file_checksums(directory / MEGATRON_INDEX_FILE, digest)


def _publish(partial: Path, out: Path, manifest: dict) -> Path:
    """Rename the finished directory into place; an outdated or damaged set there is replaced, a sound twin kept."""
    if _sound_twin(out, manifest):
        return out  # another process finished the same set first
    if out.exists():
        stale = out.with_name(f"{out.name}.stale-{_owner()}")
        with suppress(FileNotFoundError):  # another process may have moved it away first
            out.rename(stale)  # readers that mapped the old files keep them until they close
        shutil.rmtree(stale, ignore_errors=True)
    try:
        partial.rename(out)
    except OSError:
        if not _sound_twin(out, manifest):
            raise
    return out


def _sound_twin(out: Path, manifest: dict) -> bool:
    current = read_manifest(out)
    return (
        current is not None and current.get("source") == manifest["source"] and not find_damage(out, current, full=True)
    )


# --- what a killed prepare leaves behind ----------------------------------------------------------------------------


def _owner() -> str:
    """HOST-PID: names this process's working directories, so a later prepare can tell whether it still runs."""
    return f"{socket.gethostname()}-{os.getpid()}"


def remove_leftovers(out: Path) -> None:
    """Remove ``OUT.partial-HOST-PID`` and ``OUT.stale-HOST-PID`` directories whose process on this host has ended
    (a prepare killed before its clean-up ran). A live process's are left alone, and so are another host's (on a
    shared filesystem), since whether it runs cannot be seen from here. ``OUT.partial-PID``, named before the host
    was part of the name, counts as this host's."""
    if not out.parent.is_dir():
        return
    host = socket.gethostname()
    for leftover in out.parent.glob(f"{glob.escape(out.name)}.*-*"):
        kind, _, owner = leftover.name[len(out.name) + 1 :].partition("-")
        owner_host, _, pid = owner.rpartition("-")
        if kind not in ("partial", "stale") or not pid.isdigit() or owner_host not in (host, ""):
            continue
        if _running(int(pid)):
            continue
        shutil.rmtree(leftover, ignore_errors=True)
        _log.info(f"removed {str(leftover)!r}, left by a prepare that no longer runs (pid {pid})")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    return True


# --- tokenizing and writing: in order, never more than a batch per worker in flight ---------------------------------


def _batches(pieces: Iterable[Piece]) -> Iterator[list[Piece]]:
    batch: list[Piece] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece.text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _sync(f: Any) -> None:
    """The set is renamed into place next: its bytes must be on disk first, or a crash could publish holes."""
    f.flush()
    os.fsync(f.fileno())


def _write_tokens(
    directory: Path, pieces: Iterable[Piece], tokenizer: Any, info: dict, *, dtype: str, workers: int, progress_total
) -> dict:
    from tqdm import tqdm

    eos = info["eos_id"]
    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    num_tokens, num_documents, max_id, document_length = 0, 0, eos, 0
    sums = {TOKENS_FILE: hashlib.sha256(), INDEX_FILE: hashlib.sha256()}  # of every byte, as it is written
    bar = tqdm(total=progress_total, unit="B", unit_scale=True, desc="prepare", disable=progress_total is None)
    with bar, open(directory / TOKENS_FILE, "wb") as tokens_out, open(directory / INDEX_FILE, "wb") as index_out:

        def put(data: bytes, file: Any, name: str) -> None:
            file.write(data)
            sums[name].update(data)

        put(np.zeros(1, dtype=np.int64).tobytes(), index_out, INDEX_FILE)

        def write(batch: list[Piece], ids: np.ndarray, lengths: np.ndarray) -> None:
            nonlocal num_tokens, num_documents, max_id, document_length
            parts, ends = [], []
            start = 0
            for piece, length in zip(batch, lengths):
                parts.append(ids[start : start + length])
                start += length
                document_length += int(length)
                if piece.ends_document:
                    parts.append(np.array([eos], dtype=np.uint32))
                    document_length += 1
                    num_tokens += document_length
                    ends.append(num_tokens)
                    document_length = 0
            flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
            if flat.size:
                max_id = max(max_id, int(flat.max()))
            put(flat.astype(np.dtype(dtype)).tobytes(), tokens_out, TOKENS_FILE)
            put(np.asarray(ends, dtype=np.int64).tobytes(), index_out, INDEX_FILE)
            num_documents += len(ends)
            bar.update(sum(len(p.text) for p in batch))

        texts = ((batch, [p.text for p in batch]) for batch in _batches(pieces))
        if workers == 1:
            backend = backend_tokenizer(tokenizer_json)
            encoded: Generator = ((batch, *encode(batch_texts, backend)) for batch, batch_texts in texts)
        else:
            encoded = encode_in_workers(texts, tokenizer_json=tokenizer_json, workers=workers)
        with closing(encoded):  # on an error, the workers stop now, not when the traceback is freed
            for batch, ids, lengths in encoded:
                write(batch, ids, lengths)
        _sync(tokens_out)
        _sync(index_out)
    if num_documents == 0:
        raise PptkError("the inputs hold no non-blank document; give text to prepare")
    checksums = {name: file_checksums(directory / name, digest.hexdigest()) for name, digest in sums.items()}
    return {"num_tokens": num_tokens, "num_documents": num_documents, "max_token_id": max_id, "checksums": checksums}
