# Start N local ranks (gloo on CPU, NCCL on GPUs) for pptk's own multi-process checks; one failure stops them all.
from __future__ import annotations

import os
import random
import socket
import sys
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from pptk.errors import PptkError, exit_now

# Backstop for a rank stuck in a collective after a peer died in a way the parent did not notice.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


def free_port() -> int:
    """A free port for a launch's rendezvous (MASTER_PORT), chosen below the kernel's ephemeral range.

    The kernel hands ephemeral ports to every outgoing connection and to gloo's listeners, so a port taken from that
    range (bind to 0, then close) can be in use again by the time the launcher binds it; two launches running at
    once made that happen. Ports below the range are only ever taken by explicit choice. Falls back to the kernel's
    choice when none of the sampled ports is free."""
    low = _ephemeral_low()
    for port in random.SystemRandom().sample(range(max(1024, low - 12000), low), 64):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS uses 49152 and up


@contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _rank_entry(rank: int, world_size: int, log_dir: str, worker: Callable, args: tuple) -> None:
    log = open(Path(log_dir) / f"rank{rank}.log", "w", buffering=1)  # noqa: SIM115 (stays open as this rank's stdout)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size)
    )
    try:
        worker(rank, *args)
    except BaseException as err:
        summary = str(err) if isinstance(err, PptkError) else f"{type(err).__name__}: {err}"
        (Path(log_dir) / f"rank{rank}.error").write_text(summary)
        traceback.print_exc()
        raise
    # Done: skip the interpreter's teardown of torch, DeepSpeed and transformers (seconds per rank, which the
    # launch would wait for). Every file this rank wrote is closed; exit_now flushes its output into the log.
    exit_now(0)


def run_ranks(
    worker: Callable, *, world_size: int, args: tuple = (), log_dir: str | Path, timeout_s: float = 600.0
) -> None:
    """Run ``worker(rank, *args)`` in ``world_size`` fresh processes wired for torch.distributed.

    Each rank's output goes to ``log_dir/rank{r}.log``. If any rank fails, the others are terminated at once (no
    rank is left waiting in a collective) and a PptkError carries the first failure and where the logs are.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    with _environment(env):
        context = mp.start_processes(
            _rank_entry,
            args=(world_size, str(log_dir), worker, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline_hits = 0
        try:
            while not context.join(timeout=5):
                deadline_hits += 5
                if deadline_hits >= timeout_s:
                    raise PptkError(f"ranks still running after {timeout_s:.0f}s; see {log_dir}/rank*.log")
        except ProcessException as err:
            # the earliest failure is the cause; later ones are usually peers losing their connection to it
            errors = sorted(log_dir.glob("rank*.error"), key=lambda p: p.stat().st_mtime_ns)
            first = errors[0].read_text() if errors else str(err).strip().splitlines()[-1]
            rank = errors[0].stem if errors else f"rank{err.error_index}"
            raise PptkError(f"{rank} failed: {first} (all ranks stopped; logs: {log_dir}/rank*.log)") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            for process in context.processes:
                process.join(timeout=10)
                if process.is_alive():
                    process.kill()
    sys.stdout.flush()
