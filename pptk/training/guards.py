# Divergence caught before NaN: a loss far above its recent level stops the run, and is never checkpointed.
"""A NaN loss stops a run, but a run blows up first: a loss of 1e9 is still finite, and a checkpoint saved then
holds weights that turn NaN a step later, with ``latest`` pointing at them. ``DivergenceGuard`` watches the loss:

- a step is *bad* when its loss is not finite, or above ``factor`` x the median of the last ``window`` good losses
  (once ``warmup`` good steps are seen; the first steps of a run fall fast and are not judged);
- a bad step is not checkpointed (the trainer skips the save and says so), so ``latest`` stays on good weights.
  A step's loss is measured before its own update, so before a save the trainer also measures the loss of the
  updated weights (a forward pass on the next step's micro-batches) and skips the save when that one spikes
  (``spiked``): a blow-up in the very update before a save is caught too;
- ``max_bad_steps`` bad steps in a row stop the run with one error (``Diverged``) naming the loss, the median and
  the fix. One spike alone (a bad batch) is tolerated when ``max_bad_steps`` > 1;
- a step whose update DeepSpeed skipped (every DeepSpeed optimizer wrapper checks the gradients: ZeRO's, fp16's
  loss scaler, BF16_Optimizer) is a bad step whatever its loss: its gradients were not finite, and a loss measured
  before the update says nothing about that (at --lr 1e30 the loss stays near 6 while every update is skipped).
  The one exception is fp16's dynamic loss scaler searching its scale (``dynamic_loss_scale``): with a finite
  loss, it skips overflowing updates by design, and raises itself once the scale reaches its minimum;
- a non-finite loss whose update was applied (torch's own optimizer, fp32 at ZeRO stage 0) stops the run at once,
  as the weights are no longer finite;
- weights whose norm jumped before a save (the trainer measures it, see ``pptk.training.saving``) are a bad step
  too (``weights_blew_up``).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from pptk import deepspeed_compat as compat
from pptk.errors import PptkError
from pptk.failpoints import failpoint_armed

FIX = "with a lower --lr, more --warmup-steps or --grad-clip"


class Diverged(PptkError):
    """The run must stop: its loss or weights diverged. The trainer adds where ``latest`` stands."""


@dataclass
class DivergenceGuard:
    factor: float = 10.0  # 0 switches the spike check off (a non-finite loss still stops the run)
    max_bad_steps: int = 3
    window: int = 50
    warmup: int = 10
    dynamic_loss_scale: bool = False  # fp16's loss scaler: its skips of overflowing updates are expected
    recent: deque = field(default_factory=deque)
    bad_streak: int = 0

    def _limit(self) -> float | None:
        """The loss above which a step is bad; None while the spike check is off or still warming up."""
        if self.factor <= 0 or len(self.recent) < self.warmup:
            return None
        return self.factor * max(statistics.median(self.recent), 1e-6)

    def spiked(self, loss: float) -> bool:
        """Whether ``loss`` would be a bad step, without counting it (the check of the weights about to be saved)."""
        limit = self._limit()
        return not math.isfinite(loss) or (limit is not None and loss > limit)

    def judging(self) -> bool:
        return self._limit() is not None

    def _bad_step(self, why: str, stop_message: Callable[[int], str]) -> str:
        """Count one more bad step in a row; raise ``stop_message(streak)`` once there are ``max_bad_steps``."""
        self.bad_streak += 1
        if self.bad_streak >= self.max_bad_steps:
            raise Diverged(stop_message(self.bad_streak))
        return why

    def check(self, loss: float, *, step: int, update_skipped: bool = False) -> str | None:
        """Record this step's loss; why it is bad, or None when it is not. Raises ``Diverged`` when the run must stop.

        ``update_skipped``: DeepSpeed skipped this step's optimizer update (its gradients were not finite): a bad
        step whatever the loss, as the weights were left as they were (unless fp16's scaler is searching its scale).
        A non-finite loss whose update was applied stops the run at once.
        """
        finite = math.isfinite(loss)
        if update_skipped and not (finite and self.dynamic_loss_scale):
            return self._bad_step(
                "DeepSpeed skipped its update (non-finite gradients)",
                lambda streak: (
                    f"the run diverged: {streak} bad steps in a row, the last one step {step}, whose update DeepSpeed "
                    f"skipped (non-finite gradients; loss {loss:.4g}); resume from the last good checkpoint {FIX}"
                ),
            )
        if not finite:
            raise Diverged(
                f"the run diverged: the loss became {loss} at step {step} and its update was applied; resume from "
                f"the last good checkpoint {FIX}"
            )
        limit = self._limit()
        if limit is not None and loss > limit:
            return self._bad_step(
                f"its loss {loss:.4g} spiked above {self.factor:g} x the recent median {limit / self.factor:.4g}",
                lambda streak: (
                    f"the loss is diverging: {loss:.4g} at step {step}, {streak} steps in a row above "
                    f"{self.factor:g} x the recent median {limit / self.factor:.4g}; resume from the last good "
                    f"checkpoint (it predates the spike) {FIX}, or raise --loss-spike-factor"
                ),
            )
        self.bad_streak = 0
        self.recent.append(loss)
        if len(self.recent) > self.window:
            self.recent.popleft()
        return None

    def weights_blew_up(self, *, step: int, norm: float, reference: float) -> str:
        """Count the step whose updated weights' norm jumped (their save was skipped) as a bad step; raises
        ``Diverged`` when it ends a streak of ``max_bad_steps``."""
        return self._bad_step(
            f"its weights' norm jumped {norm / reference:.3g}x",
            lambda streak: (
                f"the run diverged: {streak} bad steps in a row, the last one step {step}, whose weights' norm jumped "
                f"to {norm:.3g}, {norm / reference:.3g} x its {reference:.3g} at the last save (or the start); resume "
                f"from the last good checkpoint {FIX}"
            ),
        )


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
