"""Fault injection for the tests, armed by PPTK_FAILPOINT: comma-separated ``name:rank:step`` entries (rank ``*``
for every rank). Unset, every function here is a no-op; the recipes never set it."""

from __future__ import annotations

import os
import signal

import torch.distributed as dist


def failpoint_armed(name: str, *, step: int) -> bool:
    """Whether PPTK_FAILPOINT names this rank at this step."""
    armed = set(os.environ.get("PPTK_FAILPOINT", "").split(","))
    return bool(armed & {f"{name}:{dist.get_rank()}:{step}", f"{name}:*:{step}"})


def failpoint(name: str, *, step: int) -> None:
    """save:1:16 SIGKILLs global rank 1 midway through the step-16 save. nan:R:S is checked by save_checkpoint
    itself (a NaN in rank R's weights), and nanloss:*:S by the trainer (see pptk.training.guards.nan_loss_failpoint).
    A full disk needs no failpoint: the tests give a rank a real file size limit (tests/distributed/
    test_failing_well.py)."""
    if failpoint_armed(name, step=step) and name == "save":
        os.kill(os.getpid(), signal.SIGKILL)
