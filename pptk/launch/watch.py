# Ranks that outlive their launcher: stop them.
"""On one node, ``deepspeed`` (DeepSpeed's runner) starts ``deepspeed.launcher.launch``, which starts the ranks.
A batch scheduler that sends SIGTERM to ``deepspeed`` alone ends only it: the runner forwards no signal on one
node, so ``launch`` and every rank train on as orphans, writing to the output directory. Each rank therefore
watches its launcher: when ``launch``'s parent changes (the runner is gone) or ``launch`` itself is gone, the rank
says so in one line and exits. Checkpoints are written to ``stepN.partial`` and renamed when complete, so an exit
midway through a save leaves the previous checkpoint as ``latest``.

Both this watch and DeepSpeed's launcher (which SIGTERMs every rank when one fails) stop a rank with SIGTERM, and a
rank turns SIGTERM into an exception: ``finally`` blocks run on the way out. One of them matters beyond pptk: torch
holds a build lock while it loads a JIT-built DeepSpeed op, and a rank killed inside it left the lock for every later
start on the machine to wait on forever.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

# {global rank: pid} of the ranks DeepSpeed's launch started on this node, read from /proc when the watch starts
# (launch starts them all before any has imported torch), so a survivor can name a rank that died by a signal.
_SIBLINGS: dict[int, int] = {}


def parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` from /proc (Linux), or None when it is gone or unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # fields after "(comm)": state, ppid, ...


def _under_deepspeed_launch(pid: int) -> bool:
    try:
        return b"deepspeed.launcher.launch" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _started_by(launch: int) -> dict[int, int]:
    """{global rank: pid} of the processes ``launch`` started, from their environments (``RANK``)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or parent_of(int(proc.name)) != launch:
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"RANK=") and item[5:].isdigit():
                found[int(item[5:])] = int(proc.name)
    return found


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True  # reaped
    return state in ("Z", "X")  # dead, not yet reaped


def dead_ranks(*, wait_s: float = 0.0) -> list[int]:
    """The ranks on this node whose process has died, waiting up to ``wait_s`` for one to show (a collective
    notices a lost peer as its sockets close, a moment before the process is marked dead). Empty where unknown:
    not under DeepSpeed's launcher, or the rank ran on another node."""
    deadline = time.monotonic() + wait_s
    while True:
        dead = sorted(rank for rank, pid in _SIBLINGS.items() if pid != os.getpid() and _gone(pid))
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.1)


def watch_launcher(*, interval_s: float = 1.0) -> bool:
    """Start the watch (a daemon thread) when this process runs under DeepSpeed's launcher; True if started."""
    launch = os.getppid()
    runner = parent_of(launch)
    if runner is None or not _under_deepspeed_launch(launch):
        return False
    rank = os.environ.get("RANK", "?")
    _SIBLINGS.update(_started_by(launch))

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != launch or parent_of(launch) != runner:
                print(
                    f"rank {rank}: the deepspeed launcher is gone (signalled?); stopping", file=sys.stderr, flush=True
                )
                os.kill(os.getpid(), signal.SIGTERM)  # unwinds the main thread (exit_on_sigterm)
                time.sleep(10)  # the main thread may sit in a collective that never returns
                os._exit(143)  # 128 + SIGTERM, as if the signal had reached this rank

    threading.Thread(target=watch, name="pptk-launcher-watch", daemon=True).start()
    return True


def exit_on_sigterm() -> None:
    """Make SIGTERM raise ``SystemExit(143)`` in the main thread, so the rank unwinds (``finally`` blocks release
    what they hold, torch's build lock included) before pptk.launch.entry.run_main ends the process."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
