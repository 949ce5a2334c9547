# The loss as the mean over every counted token of the global batch, not a mean of per-micro-batch means.
"""Hugging Face's Trainer and TRL divide a step's summed token losses by the step's token count over all
micro-batches and replicas (``num_items_in_batch``). DeepSpeed's pipeline engine instead averages each micro-batch's
loss over the ``grad_accum_steps`` micro-batches and the ``dp`` replicas. With uneven counts (answers of different
lengths, a masked-LM's random masks) the two differ, and a micro-batch with no counted token gives NaN.

``TokenMeanLoss`` makes them agree: before a step, the trainer counts the step's items on every replica
(``count_items`` over its micro-batches, one all-reduce over the dp group) and calls ``begin_step``; each
micro-batch's loss is then its summed token loss x ``micro_batches`` / ``total``, so the engine's mean over
micro-batches and replicas is exactly sum / total, and a micro-batch without a counted token adds zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

IGNORE = -100


def shifted_items(labels: torch.Tensor) -> int:
    """Causal-LM targets: Hugging Face's loss shifts the labels by one, so the first column never counts."""
    return int((labels[..., 1:] != IGNORE).sum())


def unshifted_items(labels: torch.Tensor) -> int:
    """Masked-LM / token-classification targets: every label that is not -100."""
    return int((labels != IGNORE).sum())


class TokenMeanLoss:
    """``loss(logits, labels, num_items_in_batch=...)`` (Hugging Face's signature) normalised per step."""

    def __init__(self, loss: Callable[..., torch.Tensor], count_items: Callable[[torch.Tensor], int]):
        self.loss = loss
        self.count_items = count_items
        self.items_per_micro_batch: float | None = None  # None: a plain per-micro-batch mean (before begin_step)

    def begin_step(self, *, total_items: int, micro_batches: int) -> None:
        """``total_items``: counted tokens of the step over all replicas; ``micro_batches``: grad_accum x dp."""
        self.items_per_micro_batch = max(total_items, 1) / micro_batches

    def local_items(self, batches: Iterable[tuple]) -> int:
        return sum(self.count_items(labels) for _, labels in batches)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.items_per_micro_batch is None:
            return self.loss(logits, labels)
        return self.loss(logits, labels, num_items_in_batch=self.items_per_micro_batch)


def global_items(local: int, *, group) -> int:
    """The step's item count over the data-parallel replicas (every rank of a replica counts the same batches)."""
    import torch.distributed as dist

    total = torch.tensor(local, dtype=torch.int64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return int(total)


def evaluate_token_mean(engine, loss: TokenMeanLoss | None, batches: list, *, dp_size: int) -> float:
    """``engine.eval_batch`` over this replica's ``batches`` (every replica the same number), as the mean over every
    counted token of all replicas' batches: a collective over every rank. ``loss`` None (the engine was built with
    another loss function): the mean of the micro-batch means."""
    import torch.distributed as dist

    if loss is None:
        mean = torch.tensor(float(engine.eval_batch(iter(batches), num_micro_batches=len(batches))))
        dist.all_reduce(mean)
        return mean.item() / dist.get_world_size()
    local = torch.tensor(float(loss.local_items(batches)), dtype=torch.float64)
    dist.all_reduce(local)  # each replica's count, once per rank of the replica
    total = round(local.item() * dp_size / dist.get_world_size())
    loss.begin_step(total_items=total, micro_batches=len(batches) * dp_size)
    mean = torch.tensor(float(engine.eval_batch(iter(batches), num_micro_batches=len(batches))), dtype=torch.float64)
    dist.all_reduce(mean)
    return mean.item() / dist.get_world_size()
