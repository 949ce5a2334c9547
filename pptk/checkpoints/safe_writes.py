# How a checkpoint reaches the disk: small files replaced atomically, the tag published last, and a failed write
# (a full disk) stopping every rank in step with the partial tag removed.
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from pptk.checkpoints.integrity import MANIFEST, FileLedger, WriteFailure, expected_checkpoint_bytes, format_bytes
from pptk.errors import PptkError, StoppedByPeer


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failed write (a full disk); gone already after the replace


def publish(partial: Path, final: Path, manifest: dict, *, retry: str = "resume") -> None:
    """Write the manifest into ``partial``, rename it to ``final`` and point ``latest`` at it, each step atomic. A
    write that fails here (the disk filled up) removes the new tag and leaves ``latest`` where it was; the error
    ends with what to do once there is space (``retry``)."""
    latest = final.parent / "latest"
    renamed = False
    try:
        write_atomically(partial / MANIFEST, json.dumps(manifest, indent=1))
        if final.exists():  # an earlier run's tag of the same name: replace it only now that the new one is whole
            stale = final.with_name(final.name + ".replaced")
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            partial.rename(final)
            shutil.rmtree(stale)
        else:
            partial.rename(final)
        renamed = True
        write_atomically(latest, final.name)
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        kept = latest.read_text().strip() if latest.is_file() else None
        if renamed and kept != final.name:
            shutil.rmtree(final, ignore_errors=True)
        writing = "latest" if renamed else MANIFEST
        raise PptkError(
            f"could not finish checkpoint {final.name} in {final.parent}: writing {writing} failed "
            f"({err.strerror or err}); {final.name} was removed and "
            + (f"latest ({kept}) is intact" if kept else "no checkpoint is there")
            + f"; free space there and {retry}"
        ) from None


def from_every_rank(value) -> list:
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def stop_if_a_write_failed(files: FileLedger, *, tag: str, checkpoints_dir: Path, params: int) -> dict:
    """Collective, after each phase of writes: every rank's recorded files (name -> size, sha256), or, where a write
    failed on any rank, the partial tag removed and every rank stopped: one line per failing rank saying what it
    could not write and the space one checkpoint needs there, one line per other rank (see run_main)."""
    gathered = from_every_rank((files.files, files.failure))
    if not any(failure for _, failure in gathered):
        return {name: entry for recorded, _ in gathered for name, entry in recorded.items()}
    if dist.get_rank() == 0:
        shutil.rmtree(files.tag_dir, ignore_errors=True)
    dist.barrier()  # removed before any rank leaves: the launcher stops the others as soon as one has gone
    if files.failure is None:
        raise StoppedByPeer(code=2)
    raise PptkError(write_failed(files.failure, tag=tag, checkpoints_dir=checkpoints_dir, params=params))


def write_failed(failure: WriteFailure, *, tag: str, checkpoints_dir: Path, params: int) -> str:
    """The one line a rank prints when a write of checkpoint ``tag`` failed: what, why, the space one checkpoint of
    ``params`` parameters needs and where, the fix, and which checkpoint is intact."""
    needed = expected_checkpoint_bytes(checkpoints_dir, params=params)
    existing = checkpoints_dir
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    latest = checkpoints_dir / "latest"
    kept = latest.read_text().strip() if latest.is_file() else None
    return (
        f"could not write checkpoint {tag}: {failure.describe()}; one checkpoint needs about {format_bytes(needed)} "
        f"in {checkpoints_dir} ({format_bytes(free)} free): {failure.fix(elsewhere='another --output-dir')} and resume"
        + (f" from latest ({kept}), which is intact" if kept else "")
    )
