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


def watch_launcher(*, interval_s: float = 1.0) -> bool:
    """Start the watch (a daemon thread) when this process runs under DeepSpeed's launcher; True if started."""
    launch = os.getppid()
    runner = parent_of(launch)
    if runner is None or not _under_deepspeed_launch(launch):
        return False
    rank = os.environ.get("RANK", "?")

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
    what they hold, torch's build lock included) before pptk.errors.run_main ends the process."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
