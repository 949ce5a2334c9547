# One logger for pptk that knows its rank: rank 0 speaks by default, every rank with `--log-all-ranks`.
"""Library code logs through ``logging.getLogger("pptk")`` (or a child such as ``pptk.training.trainer``) instead of
printing. ``setup_logging`` is called once per process by the trainer and the CLI:

- rank 0 logs at INFO, plain messages to stdout (what a user reads in the launcher's output);
- other ranks log warnings and errors only, prefixed ``[rank R]``, unless ``all_ranks`` is set;
- ``all_ranks`` prefixes every line with its rank, so interleaved output from several ranks stays readable.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "pptk"


def rank_from_env() -> int:
    """The global rank the launcher gave this process (0 outside a launcher)."""
    return int(os.environ.get("RANK", "0"))


class _RankPrefix(logging.Formatter):
    def __init__(self, rank: int, prefix: bool):
        super().__init__("%(message)s")
        self.prefix = f"[rank {rank}] " if prefix else ""

    def format(self, record: logging.LogRecord) -> str:
        return self.prefix + super().format(record)


class _AroundProgressBar(logging.StreamHandler):
    """Writes through tqdm, which lifts a live progress bar off the terminal line first, so a log line never lands
    in the middle of the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging(*, rank: int | None = None, all_ranks: bool = False) -> logging.Logger:
    """Configure the ``pptk`` logger for this process; calling it again replaces the previous set-up."""
    rank = rank_from_env() if rank is None else rank
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = _AroundProgressBar(sys.stdout)
    handler.setFormatter(_RankPrefix(rank, prefix=all_ranks or rank != 0))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 or all_ranks else logging.WARNING)
    logger.propagate = False  # DeepSpeed configures the root logger; pptk's lines are not to be repeated there
    return logger


def get_logger(name: str) -> logging.Logger:
    """A child of the ``pptk`` logger (``name`` is usually ``__name__``)."""
    return logging.getLogger(name if name.startswith(LOGGER_NAME) else f"{LOGGER_NAME}.{name}")


def quiet_deepspeed_startup() -> None:
    """Keep DeepSpeed's import-time notices ("Setting accelerator to CPU", ...) out of a tool's output: only its
    errors pass. DeepSpeed sets its logger's level when it is imported, so a filter, which it leaves alone, does it."""
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
