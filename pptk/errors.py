# The exception types for bad user input and for a rank that stops because another failed; a prompt exit.
import logging
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


def exit_now(code: int) -> None:
    """Leave with ``code`` at once, output flushed, skipping the interpreter's teardown (see run_main)."""
    logging.shutdown()  # flushes every handler (pptk's write to stdout)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
