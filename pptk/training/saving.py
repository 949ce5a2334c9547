# Which steps' weights get checkpointed: only sound ones (no bad step, no spiking loss, no blown-up norm).
"""A save is where a blow-up becomes permanent: ``latest`` points at it and every resume starts from it. So at each
step due to save, ``Saver.save`` (every rank alike) judges the updated weights first:

- a step the guard found bad (a loss spike, an update DeepSpeed skipped) is not saved;
- the updated weights' own loss, as a step's loss predates its update: one forward pass on the next step's
  micro-batches (which that step then trains on); a spike there skips the save;
- the weights' global norm against the norm at the last save (or at the start): a jump of more than ``NORM_JUMP``
  x skips the save and is a bad step. DeepSpeed skips updates whose gradients are not finite, but not the one huge
  finite update that put the weights at 1e29, and the losses after it can stay finite and flat;
- non-finite weights are refused by ``save_checkpoint`` itself (it stops the run).

A run whose last save was refused ends in ``Diverged`` (``check_last_save``), as one that stops on bad steps does:
never exit code 0 with a summary of weights that were not kept. ``stop_when_diverged`` says it once, with where
``latest`` stands.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pptk.checkpoints.training import save_checkpoint
from pptk.errors import StoppedByPeer
from pptk.logs import get_logger
from pptk.parallel.layout import Layout
from pptk.parallel.pipeline import PipelinePlan
from pptk.training.config import RunConfig
from pptk.training.guards import FIX, Diverged, DivergenceGuard
from pptk.training.task_hooks import Batch, replica_mean

log = get_logger(__name__)

# Healthy training moves the weights' norm slowly (Adam moves each weight by about lr per step, weight decay pulls it
# back): the demo, from scratch at lr 3e-3, doubles it over its 400 steps (x1.45 by step 100); fine-tuning barely
# moves it. A 100x jump between two saves is nothing training does on purpose: it is a blown-up update (lr 1e30 makes
# it ~1e30x), and saving it would make every resume start from garbage.
NORM_JUMP = 100.0


def weight_norm(module: torch.nn.Module) -> float:
    """The global L2 norm of the trained weights over every rank: one all-reduce, so every rank must call it.

    A parameter held by several ranks (data-parallel replicas, tied copies, tensor-parallel duplicates) counts once
    per holder: a constant factor, which the ratio of two norms cancels. In float64, as blown-up weights (1e29)
    overflow a float32 sum of squares.
    """
    params = [p.detach() for p in module.parameters() if p.requires_grad]  # LoRA: the adapters, not the frozen base
    total = torch.zeros((), dtype=torch.float64, device=params[0].device if params else "cpu")
    for p in params:
        total += torch.linalg.vector_norm(p, dtype=torch.float64) ** 2
    dist.all_reduce(total)
    return math.sqrt(total.item())


def latest_note(checkpoints_dir: Path) -> str:
    latest = checkpoints_dir / "latest"
    if latest.exists():
        return f"{latest} holds {latest.read_text().strip()}, the last good weights"
    return f"no checkpoint was saved in {checkpoints_dir}"


@contextmanager
def stop_when_diverged(*, rank: int, checkpoints_dir: Path) -> Iterator[None]:
    """A ``Diverged`` inside is said once, by rank 0, with where ``latest`` stands; the other ranks judged the same
    numbers (losses and norms are reduced over all ranks) and leave quietly with its exit code."""
    try:
        yield
    except Diverged as err:
        if rank != 0:
            raise StoppedByPeer(code=2) from None
        raise Diverged(f"{err}; {latest_note(checkpoints_dir)}") from None


@dataclass
class Saver:
    """Checkpoints a step's weights when they are sound; remembers why the last due save was refused."""

    run: RunConfig
    engine: Any
    plan: PipelinePlan
    layout: Layout
    guard: DivergenceGuard
    rank: int
    reference_norm: float = math.nan  # the weights' norm at the last save, or at the start (``start``)
    refused: str | None = None  # why the last due save did not happen; None once one did

    def start(self) -> None:
        """Measure the starting weights (collective), the reference of the first save."""
        self.reference_norm = weight_norm(self.engine.module)

    def _updated_loss(self, data: Iterator[Batch]) -> tuple[float | None, Iterator[Batch]]:
        """The loss of the updated weights on the next step's micro-batches (every rank), handed back to the stream;
        None while the guard has no recent level to compare it with."""
        if not self.guard.judging():
            return None, data
        ahead = list(itertools.islice(data, self.layout.grad_accum_steps))
        loss = replica_mean(float(self.engine.eval_batch(iter(ahead), num_micro_batches=len(ahead))))
        return loss, itertools.chain(ahead, data)

    def save(self, step: int, *, bad_step: str | None, data: Iterator[Batch]) -> Iterator[Batch]:
        """Checkpoint this step's weights if they are sound (collective); returns the data stream, whose next
        micro-batches the spike check borrows. ``bad_step``: why the guard found the step bad, if it did. Raises
        ``Diverged`` when a blown-up norm ends a streak of bad steps."""
        if bad_step is not None:
            return self._refuse(step, bad_step, data)
        loss, data = self._updated_loss(data)
        if loss is not None and self.guard.spiked(loss):
            return self._refuse(step, f"the updated weights give loss {loss:.4g}, a spike", data)
        norm = weight_norm(self.engine.module)
        reference = max(self.reference_norm, 1e-12)
        if math.isfinite(norm) and norm > NORM_JUMP * reference:
            data = self._refuse(step, f"the weights' norm jumped {norm / reference:.3g}x, to {norm:.3g}", data)
            self.guard.weights_blew_up(step=step, norm=norm, reference=reference)
            return data
        save_checkpoint(
            self.engine,
            self.plan,
            layout=self.layout,
            checkpoints_dir=self.run.checkpoints_dir,
            step=step,
            extra={"run_config": self.run.to_dict(), "recent_losses": list(self.guard.recent)},
            lora=self.run.lora,
        )
        self.reference_norm, self.refused = norm, None
        return data

    def _refuse(self, step: int, reason: str, data: Iterator[Batch]) -> Iterator[Batch]:
        self.refused = reason
        if self.rank == 0:
            log.warning(f"step {step}: {reason}; no checkpoint now, so {latest_note(self.run.checkpoints_dir)}")
        return data

    def check_last_save(self, step: int) -> None:
        """A run whose last save was refused diverged: its trained weights were not kept."""
        if self.refused is not None:
            raise Diverged(
                f"the run diverged: its last step {step} was not saved ({self.refused}); resume from the last good "
                f"checkpoint {FIX}"
            )
