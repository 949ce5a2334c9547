# Which steps a run trains, evaluates and checkpoints: --max-steps, or --epochs over whole steps of the data.
from __future__ import annotations

from dataclasses import dataclass

from pptk.data.sampler import Shard, micro_batches_per_epoch
from pptk.errors import PptkError
from pptk.parallel.layout import Layout
from pptk.training.config import RunConfig


@dataclass(frozen=True)
class StepPlan:
    """Which steps run, and which of them evaluate and checkpoint."""

    max_steps: int
    eval_every: int
    save_every: int
    steps_per_epoch: int | None = None  # epoch-based runs: evaluate and checkpoint at every epoch end

    def epoch_of(self, step: int) -> int | None:
        if self.steps_per_epoch is None:
            return None
        return min(-(-step // self.steps_per_epoch), -(-self.max_steps // self.steps_per_epoch))

    def evaluates(self, step: int) -> bool:
        if self.steps_per_epoch is not None:
            return step % self.steps_per_epoch == 0 or step == self.max_steps
        return step % self.eval_every == 0 or step == self.max_steps

    def saves(self, step: int) -> bool:
        epoch_end = self.steps_per_epoch is not None and step % self.steps_per_epoch == 0
        return step % self.save_every == 0 or epoch_end or step == self.max_steps


def plan_steps(run: RunConfig, *, num_examples: int, layout: Layout) -> StepPlan:
    """--max-steps, or --epochs over whole steps of the data (--max-steps then cuts it short or stretches it)."""
    if run.optim.epochs is None:
        assert run.optim.max_steps is not None  # RunConfig requires one of them
        return StepPlan(run.optim.max_steps, run.output.eval_every, run.output.save_every)
    shard = Shard(
        dp_rank=0, dp_size=layout.dp, micro_batch_size=layout.micro_batch_size, grad_accum_steps=layout.grad_accum_steps
    )
    try:
        per_epoch = micro_batches_per_epoch(num_examples, shard, whole_steps=True) // layout.grad_accum_steps
    except PptkError:
        raise PptkError(
            f"{num_examples} training examples are fewer than one step's global batch of "
            f"{layout.global_batch_size}; lower --micro-batch-size or --grad-accum-steps, or give more "
            "data"
        ) from None
    max_steps = run.optim.max_steps or run.optim.epochs * per_epoch
    return StepPlan(max_steps, run.output.eval_every, run.output.save_every, steps_per_epoch=per_epoch)
