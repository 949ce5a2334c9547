# Is a prepared set's content what its manifest says? Sizes, a cheap sampled checksum, and the full checksum.
"""Two depths of the same check, because hashing a multi-gigabyte token file costs seconds to minutes:

- ``full=False`` (every training start, ``open_prepared``): the manifest's keys, each file's size, the index's first
  and last offsets (of a Megatron-layout set: its header and windows of its arrays, see pptk.data.megatron), and a
  SHA-256 of 16 chunks of 64 KiB spread over each file (1 MiB read per file). It catches truncation, a stray file of
  another size and most overwrites, never all of them;
- ``full=True`` (``pptk data prepare``'s up-to-date check): the above and a SHA-256 of every byte of both files,
  recorded while they were written. Re-running the prepare command is the way to verify a set completely.

A set prepared before checksums were recorded has none: the quick check does what it can (sizes, offsets), and the
full check reports it as unverifiable, so prepare builds it again once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pptk.data.megatron import HEADER_BYTES, index_problem

SAMPLE_CHUNKS = 16
SAMPLE_BYTES = 1 << 16
REQUIRED_KEYS = ("tokens_file", "index_file", "dtype", "num_tokens", "num_documents")


def sampled_sha256(file: Path, size: int) -> str:
    """SHA-256 of the size and of chunks at fixed places (first and last included); the whole file when small."""
    digest = hashlib.sha256(str(size).encode())
    with open(file, "rb") as f:
        if size <= SAMPLE_CHUNKS * SAMPLE_BYTES:
            digest.update(f.read(size))
        else:
            for i in range(SAMPLE_CHUNKS):
                f.seek(i * (size - SAMPLE_BYTES) // (SAMPLE_CHUNKS - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def full_sha256(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_checksums(file: Path, full: str) -> dict:
    """The manifest entry of one written file: its full SHA-256 (computed while writing) and its sampled one."""
    return {"sha256": full, "sampled_sha256": sampled_sha256(file, file.stat().st_size)}


def find_damage(path: Path, manifest: dict, *, full: bool) -> str | None:
    """What is wrong with the files of the prepared set at ``path`` by its manifest; None when nothing is found."""
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        return f"its manifest lacks {', '.join(missing)}"
    try:
        itemsize = np.dtype(manifest["dtype"]).itemsize
    except TypeError:
        return f"its manifest names an unknown dtype {manifest['dtype']!r}"
    files = {"tokens": path / manifest["tokens_file"], "index": path / manifest["index_file"]}
    megatron = manifest.get("layout") == "megatron"
    documents = manifest["num_documents"]
    # pptk's index: int64 offsets; Megatron's: a header and, for one sequence per document, 4 + 8 + 8 bytes each
    index_bytes = HEADER_BYTES + 20 * documents + 8 if megatron else (documents + 1) * 8
    sizes = {"tokens": manifest["num_tokens"] * itemsize, "index": index_bytes}
    for role, file in files.items():
        actual = file.stat().st_size if file.is_file() else None
        if actual != sizes[role]:
            return f"{file.name} has {actual} bytes, its manifest says {sizes[role]}"
    if megatron:
        problem = index_problem(files["tokens"].with_suffix(""))
        if problem is not None:
            return problem
    else:
        ends = np.fromfile(files["index"], dtype=np.int64, count=1), _last_offset(files["index"])
        if (int(ends[0][0]), ends[1]) != (0, manifest["num_tokens"]):
            return (
                f"{files['index'].name} spans tokens [{int(ends[0][0])}, {ends[1]}), its manifest says "
                f"[0, {manifest['num_tokens']})"
            )
    checksums = manifest.get("checksums")
    if checksums is None:
        return "its manifest has no checksums (an older pptk made it), so it cannot be verified" if full else None
    for role, file in files.items():
        recorded = checksums.get(file.name, {})
        key, actual_sum = (
            ("sha256", full_sha256(file)) if full else ("sampled_sha256", sampled_sha256(file, sizes[role]))
        )
        if recorded.get(key) != actual_sum:
            return f"the content of {file.name} differs from the checksum its manifest recorded"
    return None


def _last_offset(index_file: Path) -> int:
    with open(index_file, "rb") as f:
        f.seek(-8, 2)
        return int(np.frombuffer(f.read(8), dtype=np.int64)[0])
