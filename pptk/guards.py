# Divergence caught before NaN: a loss far above its recent level stops the run, and is never checkpointed.
"""A NaN loss stops a run, but a run blows up first: a loss of 1e9 is still finite, and a checkpoint saved then
holds weights that turn NaN a step later, with ``latest`` pointing at them. ``DivergenceGuard`` watches the loss:

- a step is *bad* when its loss is not finite, or above ``factor`` x the median of the last ``window`` good losses
  (once ``warmup`` good steps are seen; the first steps of a run fall fast and are not judged);
- a bad step is not checkpointed (the trainer skips the save and says so), so ``latest`` stays on good weights;
- ``max_bad_steps`` bad steps in a row stop the run with one error naming the loss, the median and the fix. One
  spike alone (a bad batch) is tolerated when ``max_bad_steps`` > 1. A non-finite loss stops the run at once.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from pptk.errors import PptkError


@dataclass
class DivergenceGuard:
    factor: float = 10.0  # 0 switches the spike check off (a non-finite loss still stops the run)
    max_bad_steps: int = 3
    window: int = 50
    warmup: int = 10
    recent: deque = field(default_factory=deque)
    bad_streak: int = 0

    def check(self, loss: float, *, step: int) -> bool:
        """Record this step's loss; True when it is bad. Raises when the run must stop."""
        if not math.isfinite(loss):
            raise PptkError(
                f"loss became {loss} at step {step}; resume from the last checkpoint with a lower --lr or more "
                "--warmup-steps"
            )
        median = statistics.median(self.recent) if len(self.recent) >= self.warmup else None
        if self.factor > 0 and median is not None and loss > self.factor * max(median, 1e-6):
            self.bad_streak += 1
            if self.bad_streak >= self.max_bad_steps:
                raise PptkError(
                    f"the loss is diverging: {loss:.4g} at step {step}, {self.bad_streak} steps in a row above "
                    f"{self.factor:g} x the recent median {median:.4g}; resume from the last checkpoint (it predates "
                    "the spike) with a lower --lr, more --warmup-steps or --grad-clip, or raise --loss-spike-factor"
                )
            return True
        self.bad_streak = 0
        self.recent.append(loss)
        if len(self.recent) > self.window:
            self.recent.popleft()
        return False
