# How a recipe's or command's main() runs on a rank: one line per failure, and a prompt exit.
import os
import signal
import sys
import time

from pptk.errors import PptkError, StoppedByPeer, exit_now
from pptk.launch.watch import dead_ranks

# What a rank's collective raises when a peer has gone (gloo and NCCL wording): a consequence, not a cause.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def run_main(main, *, program: str) -> int:
    """Run a recipe's or command's ``main()`` with one line per failure.

    - a PptkError: ``program: error: [rank R: ]message`` on stderr, exit code 2;
    - on a rank whose collective failed because another rank has gone: one line saying so, exit code 1 (the failing
      rank's own line says why), instead of a traceback per rank.

    A rank of a launch (or any process once a process group exists) leaves with ``os._exit``, after a success too: a
    normal exit would wait on collectives and teardown that a peer which has gone never joins, and tearing down
    torch, DeepSpeed and transformers takes a rank seconds that the launch then waits for.
    """
    rank, distributed = os.environ.get("RANK"), int(os.environ.get("WORLD_SIZE", "1")) > 1
    where = f"rank {rank}: " if distributed and rank is not None else ""
    try:
        code = main()
        _leave(code or 0)
        return code
    except PptkError as err:
        print(f"{program}: error: {where}{err}", file=sys.stderr, flush=True)
        _leave(2)
        return 2
    except StoppedByPeer as stop:
        print(f"{program}: {where}stopping: another rank failed (its error is above)", file=sys.stderr, flush=True)
        _leave(stop.code)
        return stop.code
    except SystemExit as err:  # SIGTERM (pptk.launch.watch.exit_on_sigterm) or argparse: already unwound
        if distributed and err.code == 128 + signal.SIGTERM:  # DeepSpeed's launch stops the others when one dies
            _name_the_dead(program, where, wait_s=0.0)
        _leave(err.code if isinstance(err.code, int) else 1)
        raise
    except RuntimeError as err:
        if not (distributed and any(marker in str(err) for marker in PEER_GONE)):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # leaving anyway: say why before the launcher's SIGTERM
        if _name_the_dead(program, where, wait_s=2.0):
            # Leave after DeepSpeed's launch (polling every second) has seen the failed rank's exit, so its exit
            # code is the failed rank's, not this one's.
            time.sleep(1.5)
        else:
            print(f"{program}: {where}stopping: another rank failed (its error is above)", file=sys.stderr, flush=True)
        _leave(1)
        return 1


def _name_the_dead(program: str, where: str, *, wait_s: float) -> bool:
    """Name the ranks on this node whose process is gone, where this node can tell; True if there were any. Whether
    one raised an error or was killed without a word (SIGKILL, the OOM killer) cannot be told from here."""
    dead = dead_ranks(wait_s=wait_s)
    if dead:
        print(
            f"{program}: {where}stopping: rank {', '.join(map(str, dead))} failed (its error is above; if it printed "
            "none, it was killed: by a signal, or out of memory)",
            file=sys.stderr,
            flush=True,
        )
    return bool(dead)


def _leave(code: int) -> None:
    """Exit now if this is one of several ranks or a process group exists (see run_main); otherwise return and let
    the caller exit."""
    try:
        import torch.distributed as dist

        group_exists = dist.is_available() and dist.is_initialized()
    except ImportError:
        group_exists = False
    if group_exists or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_now(code)
