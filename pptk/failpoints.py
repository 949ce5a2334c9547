"""Fault injection for the tests, armed by PPTK_FAILPOINT: comma-separated ``name:rank:step`` entries (rank ``*``
for every rank). Unset, every function here is a no-op; the recipes never set it."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

from pptk import deepspeed_compat as compat


def failpoint_armed(name: str, *, step: int) -> bool:
    """Whether PPTK_FAILPOINT names this rank at this step."""
    armed = set(os.environ.get("PPTK_FAILPOINT", "").split(","))
    return bool(armed & {f"{name}:{dist.get_rank()}:{step}", f"{name}:*:{step}"})


def failpoint(name: str, *, step: int) -> None:
    """save:1:16 SIGKILLs global rank 1 midway through the step-16 save; disk:0:4 makes rank 0's step-4 save fail as
    a full disk does (an error on one rank after the process group formed). nan:R:S is checked by save_checkpoint
    itself (a NaN in rank R's weights), and nanloss:*:S by the trainer (see nan_loss_failpoint)."""
    if not failpoint_armed(name, step=step):
        return
    if name == "save":
        os.kill(os.getpid(), signal.SIGKILL)
    if name == "disk":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@contextmanager
def nan_loss_failpoint(engine, *, step: int) -> Iterator[None]:
    """nanloss:*:S makes step S's loss NaN (the last stage's loss function returns NaN, so the gradients are NaN
    too), as a bad batch or an overflow would."""
    if not failpoint_armed("nanloss", step=step):
        yield
        return
    loss_fn = engine.module.loss_fn
    compat.swap_loss_fn(engine, lambda outputs, labels: loss_fn(outputs, labels) * float("nan"))
    try:
        yield
    finally:
        compat.swap_loss_fn(engine, loss_fn)
