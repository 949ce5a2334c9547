# An output directory belongs to one run at a time, and a finished run is not silently overwritten.
"""Checked on every rank before the process group forms (``claim_output_dir``):

- the directory can be created and written (otherwise one clear error, on every rank alike, not a gloo wall);
- it does not hold another run's results unless this run resumes it (``--resume-from``) or ``--overwrite`` says
  to start over there: two runs on one directory used to interleave their metrics and overwrite each other's
  checkpoints, summary and export;
- no other live run holds it. ``.pptk.lock`` names the run that holds it by its rendezvous address
  (MASTER_ADDR:MASTER_PORT, the same on every rank of one launch, different for two concurrent launches), its
  pid and host. A lock whose process is gone (same host) is stale and taken over; one from another host is
  reported with the advice to delete it if that run is over. The rank that wrote it removes it at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from pptk.checkpoints.integrity import expected_checkpoint_bytes
from pptk.errors import PptkError

LOCK_FILE = ".pptk.lock"
RESULTS = ("summary.json", "metrics.jsonl", "checkpoints/latest")


def run_identity() -> str:
    """The launch this process belongs to: every rank of one launch shares its rendezvous address."""
    return f"{os.environ.get('MASTER_ADDR', 'localhost')}:{os.environ.get('MASTER_PORT', str(os.getppid()))}"


def claim_output_dir(output_dir: Path, *, resuming: bool, overwrite: bool) -> bool:
    """Check ``output_dir`` and take its lock for this run; True when this process wrote the lock (and so
    releases it with ``release_output_dir``)."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PptkError(
            f"--output-dir {output_dir} cannot be written ({err.strerror}); choose a directory you can write to"
        ) from None
    wrote = _take_lock(output_dir / LOCK_FILE)
    previous = [name for name in RESULTS if (output_dir / name).exists()]
    if previous and not (resuming or overwrite):
        if wrote:
            release_output_dir(output_dir)
        raise PptkError(
            f"--output-dir {output_dir} already holds a run ({', '.join(previous)}); continue it with --resume-from "
            f"{output_dir / 'checkpoints'}, choose a new --output-dir, or pass --overwrite to start over there "
            "(its metrics and summary are replaced and its checkpoints rewritten as the new run saves)"
        )
    return wrote


def start_fresh(output_dir: Path) -> None:
    """--overwrite without --resume-from (rank 0): the old metrics and summary go, so nothing mixes two runs."""
    for name in ("metrics.jsonl", "summary.json"):
        with contextlib.suppress(FileNotFoundError):
            (output_dir / name).unlink()


def release_output_dir(output_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (output_dir / LOCK_FILE).unlink()


def _take_lock(path: Path) -> bool:
    me = {"run": run_identity(), "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    with open(path, "a+") as f:  # the flock serialises ranks and runs reading and writing the lock's content
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            text = f.read().strip()
            holder = json.loads(text) if text else None
            if holder is not None and holder.get("run") == me["run"]:
                return False  # another rank of this launch took it
            if holder is not None and _alive(holder):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
                raise PptkError(
                    f"another run is using {path.parent} (pid {holder.get('pid')} on {holder.get('host')}, since "
                    f"{since}); wait for it, choose another --output-dir, or delete {path} if that run is over"
                )
            f.seek(0)
            f.truncate()
            f.write(json.dumps(me))
            f.flush()
            return True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell from here: the error names the file to delete
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError):
        return True
    return True


def check_free_space(directory: Path, *, params: int) -> None:
    """Refuse to start when ``directory``'s file system cannot hold one checkpoint of ``params`` parameters (the
    size of the newest one there, else about CHECKPOINT_BYTES_PER_PARAM each): a run that fills the disk at its
    first save has trained for nothing."""
    import shutil

    needed = expected_checkpoint_bytes(directory, params=params)
    existing = directory
    while not existing.exists():  # the run creates its directories later; measure the file system they land on
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise PptkError(
            f"one checkpoint of this model ({params:,} parameters) needs about {needed / 2**30:.1f} GiB, and "
            f"{existing} has {free / 2**30:.1f} GiB free; free space there or use another --output-dir"
        )
