# Every file of a checkpoint is recorded (size, sha256) as it is saved and checked before it is read.
"""The manifest's ``files`` entry maps each file of a tag, ``pptk.json`` aside, to ``{"size": bytes, "sha256": hex}``.

Recorded by the process that wrote the file, right after writing it (``FileLedger``): DeepSpeed writes its own files
(engine, layer and ZeRO files) by path through its checkpoint engine, so there is no file object pptk could wrap
without replacing DeepSpeed's writer. Hashing the file just written reads it back from the page cache in chunks
(``hashlib.file_digest``), the same way for every writer, and checks what reached the file system rather than what
was handed to it. sha256 (about 1 GB/s with the CPU's SHA instructions) so that ``sha256sum`` confirms it by hand.

Checked before anything is loaded (``check_files``): every file's size first (a stat each), then the checksums.
Checkpoints saved before checksums existed (no ``files`` entry) get the older check: every ``.pt`` file is a whole
torch archive (a zip whose directory, written last, is there).
"""

from __future__ import annotations

import errno
import hashlib
import resource
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pptk.errors import PptkError

MANIFEST = "pptk.json"
# Bytes per parameter of one checkpoint: the weights (fp32 layer files), DeepSpeed's ZeRO shards (fp32 master copy
# and two Adam moments: 12) and pptk's per-layer optimizer states (the same 12 again, for resuming on any layout).
CHECKPOINT_BYTES_PER_PARAM = 4 + 12 + 12


def file_record(path: Path) -> dict:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"size": path.stat().st_size, "sha256": digest}


# How torch.save to a path reports a failed write (a full disk, a quota, a file size limit): not as an OSError but as
# a RuntimeError from its archive writer, "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
# midway, or from the C++ stream, "basic_ios::clear: iostream error", when the archive's end is written.
TORCH_WRITE_ERRORS = ("inline_container.cc", "iostream error")


def is_torch_write_failure(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in TORCH_WRITE_ERRORS)


@dataclass(frozen=True)
class WriteFailure:
    path: Path
    reason: str  # "No space left on device", "file too large (...)"
    file_size_limit: bool  # the process's RLIMIT_FSIZE (ulimit -f), not the disk, stopped the write

    def describe(self) -> str:
        return f"{self.path.name}: {self.reason}"

    def fix(self, *, elsewhere: str) -> str:
        return (
            "raise the limit (ulimit -f unlimited)"
            if self.file_size_limit
            else f"free space there (or use {elsewhere})"
        )


def write_failure(path: Path, err: BaseException) -> WriteFailure:
    """What stopped the write of ``path``: an OSError says it; torch's archive writer does not, so the file size
    limit is told apart from a full disk by the size the file reached."""
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    code = err.errno if isinstance(err, OSError) else None
    reached_limit = limit != resource.RLIM_INFINITY and path.is_file() and path.stat().st_size >= limit
    if code == errno.EFBIG or (code is None and reached_limit):
        if limit != resource.RLIM_INFINITY:
            return WriteFailure(path, f"file too large: this process may write files of at most {limit:,} bytes", True)
        return WriteFailure(path, "file too large for the file system", False)
    if isinstance(err, OSError):
        return WriteFailure(path, err.strerror or str(err), False)
    return WriteFailure(path, "torch could not write it (a full disk or a quota)", False)


@dataclass
class FileLedger:
    """What one process writes into the tag directory ``tag_dir``: each file's size and sha256, or the first write
    that failed. After a failure nothing more is written (the save is lost, and a full disk must not fill further),
    but the caller goes on, so a rank that failed still reaches the collectives the others wait in."""

    tag_dir: Path
    files: dict[str, dict] = field(default_factory=dict)
    failure: WriteFailure | None = None

    def write(self, path: Path, write: Callable[[], object]) -> None:
        """Run ``write``, which writes ``path``; record the file if it lies in the tag directory."""
        if self.failure is not None:
            return
        try:
            write()
        except (OSError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and not is_torch_write_failure(err):
                raise
            self.failure = write_failure(path, err)
            path.unlink(missing_ok=True)  # give back what the half-written file took
            return
        if path.parent == self.tag_dir:
            self.files[path.name] = file_record(path)

    def save(self, obj: object, path: Path) -> None:
        self.write(path, lambda: torch.save(obj, path))


@dataclass(frozen=True)
class FilesChecked:
    files: int
    bytes: int
    checksums: bool  # False: an older checkpoint without them, checked as whole torch archives only

    def describe(self) -> str:
        if not self.checksums:
            return f"{self.files} files, {format_bytes(self.bytes)}: whole torch archives (no checksums recorded)"
        return f"{self.files} files, {format_bytes(self.bytes)}: sizes and sha256 checksums match"


def check_files(
    tag_dir: Path, manifest: dict, *, only: Callable[[str], bool] | None = None, share: tuple[int, int] = (0, 1)
) -> FilesChecked:
    """Check the files of ``tag_dir`` that ``only`` selects (default: all) against the manifest: sizes of all of
    them, checksums of share ``(i, n)`` (the i-th of every n names, so n ranks split the reading). One PptkError
    names the damaged files and the tag."""
    recorded = manifest.get("files")
    if recorded is None:
        return _check_archives(tag_dir, only)
    names = sorted(name for name in recorded if only is None or only(name))
    damaged = []
    for name in names:
        path, saved = tag_dir / name, recorded[name]["size"]
        if not path.is_file():
            damaged.append(f"{name} is missing")
        elif (size := path.stat().st_size) != saved:
            damaged.append(f"{name} is {size:,} bytes, saved as {saved:,} (truncated or overwritten)")
    if not damaged:
        index, count = share
        damaged = [
            f"{name} does not match the sha256 recorded when it was saved (its content changed)"
            for name in names[index::count]
            if file_record(tag_dir / name)["sha256"] != recorded[name]["sha256"]
        ]
    if damaged:
        raise PptkError(f"checkpoint {tag_dir.name} ({tag_dir}) is damaged: {'; '.join(damaged[:4])}; {_fix(tag_dir)}")
    return FilesChecked(len(names), sum(recorded[name]["size"] for name in names), checksums=True)


def _check_archives(tag_dir: Path, only: Callable[[str], bool] | None) -> FilesChecked:
    paths = [p for p in sorted(tag_dir.glob("*.pt")) if only is None or only(p.name)]
    broken = [p.name for p in paths if not zipfile.is_zipfile(p)]
    if broken:
        raise PptkError(
            f"checkpoint {tag_dir.name} ({tag_dir}) has truncated or corrupt files ({', '.join(broken[:4])}); "
            + _fix(tag_dir)
        )
    return FilesChecked(len(paths), sum(p.stat().st_size for p in paths), checksums=False)


def _step(name: str) -> int | None:
    number = name.removeprefix("step")
    return int(number) if name.startswith("step") and number.isdigit() else None


def _fix(tag_dir: Path) -> str:
    this = _step(tag_dir.name)
    earlier = sorted(
        (step, p.name)
        for p in tag_dir.parent.iterdir()
        if (step := _step(p.name)) is not None and (this is None or step < this) and (p / MANIFEST).is_file()
    )
    where = f" ({', '.join(name for _, name in earlier[-3:])} beside it)" if earlier else ""
    return f"use an earlier step{where}, or copy the checkpoint again"


def tag_bytes(tag_dir: Path) -> int:
    return sum(p.stat().st_size for p in tag_dir.iterdir() if p.is_file())


def expected_checkpoint_bytes(checkpoints_dir: Path, *, params: int) -> int:
    """What the next checkpoint will take: the size of the newest one there (same model, usually the same layout),
    else an estimate from the parameter count."""
    latest = checkpoints_dir / "latest"
    if latest.is_file() and (tag_dir := checkpoints_dir / latest.read_text().strip()).is_dir():
        return tag_bytes(tag_dir)
    return params * CHECKPOINT_BYTES_PER_PARAM


def format_bytes(size: int) -> str:
    value, unit = float(size), "bytes"
    for larger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{size:,} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
