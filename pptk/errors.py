# The one exception type for bad user input, and how a command or recipe turns errors into one line each.
import os
import sys


class PptkError(ValueError):
    """A problem with what the user asked for, raised before any process starts where possible.

    The message says what is wrong (with the numbers involved) and how to fix it.
    """


class StoppedByPeer(Exception):
    """This rank stops because a collective told it another rank reports the failure: one line, not two.

    ``code``: the exit code, the reporting rank's (2 when every rank found the same error, such as a diverging
    loss that rank 0 reports), so the launcher's exit code does not depend on which rank it notices first."""

    def __init__(self, code: int = 1):
        super().__init__(code)
        self.code = code


# What a rank's collective raises when a peer has gone (gloo and NCCL wording): a consequence, not a cause.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def run_main(main, *, program: str) -> int:
    """Run a recipe's or command's ``main()`` with one line per failure.

    - a PptkError: ``program: error: [rank R: ]message`` on stderr, exit code 2;
    - on a rank whose collective failed because another rank has gone: one line saying so, exit code 1 (the failing
      rank's own line says why), instead of a traceback per rank.

    Once a process group exists, the process leaves with ``os._exit``: a normal exit would wait on collectives and
    teardown that a peer which has gone never joins.
    """
    rank, distributed = os.environ.get("RANK"), int(os.environ.get("WORLD_SIZE", "1")) > 1
    where = f"rank {rank}: " if distributed and rank is not None else ""
    try:
        return main()
    except PptkError as err:
        print(f"{program}: error: {where}{err}", file=sys.stderr, flush=True)
        _leave(2)
        return 2
    except StoppedByPeer as stop:
        print(f"{program}: {where}stopping: another rank failed (its error is above)", file=sys.stderr, flush=True)
        _leave(stop.code)
        return stop.code
    except SystemExit as err:  # SIGTERM (pptk.launch_watch.exit_on_sigterm) or argparse: already unwound
        _leave(err.code if isinstance(err.code, int) else 1)
        raise
    except RuntimeError as err:
        if not (distributed and any(marker in str(err) for marker in PEER_GONE)):
            raise
        print(f"{program}: {where}stopping: another rank failed (its error is above)", file=sys.stderr, flush=True)
        _leave(1)
        return 1


def _leave(code: int) -> None:
    """Exit now if a process group exists (see run_main); otherwise return and let the caller exit."""
    try:
        import torch.distributed as dist

        group_exists = dist.is_available() and dist.is_initialized()
    except ImportError:
        group_exists = False
    if group_exists:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
