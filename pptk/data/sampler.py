# The one training sampler every task uses, and the evaluation split across data-parallel replicas.
"""Which examples a data-parallel replica trains on, as a pure function of (seed, micro-batch number).

Epoch ``e`` is a permutation of the examples seeded by ``(seed, e)``; micro-batch ``i`` of that epoch on replica
``r`` holds the permutation's slice number ``i * dp_size + r``, so the replicas see disjoint examples. Because the
order depends only on the micro-batch number, a run resumed at step ``s`` (on any layout that keeps the global
batch) starts at micro-batch ``s * grad_accum_steps`` and sees exactly what the uninterrupted run would have.
Every pipeline stage of a replica builds the same stream, so the first stage's inputs and the last stage's labels
belong together.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pptk.errors import PptkError


@dataclass(frozen=True, kw_only=True)
class Shard:
    """One data-parallel replica's view of a step: which replica, how many, and how a step is batched."""

    dp_rank: int
    dp_size: int
    micro_batch_size: int
    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        for name in ("dp_size", "micro_batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise PptkError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0 <= self.dp_rank < self.dp_size:
            raise PptkError(f"dp_rank({self.dp_rank}) must be in [0, dp_size({self.dp_size}))")

    @property
    def examples_per_micro_batch(self) -> int:
        """Examples one micro-batch takes over all replicas."""
        return self.micro_batch_size * self.dp_size


def micro_batches_per_epoch(num_examples: int, shard: Shard, *, whole_steps: bool = False) -> int:
    """Micro-batches each replica gets per epoch; the rest of the examples is skipped that epoch.

    whole_steps: count only complete optimizer steps (epoch-based fine-tuning, where an epoch ends on a step).
    """
    per_epoch = num_examples // shard.examples_per_micro_batch
    if whole_steps:
        per_epoch -= per_epoch % shard.grad_accum_steps
    if per_epoch == 0:
        need = shard.examples_per_micro_batch * (shard.grad_accum_steps if whole_steps else 1)
        raise PptkError(
            f"{num_examples} training examples cannot give each of dp_size({shard.dp_size}) replicas "
            f"{'one step' if whole_steps else 'one micro-batch'} of micro_batch_size "
            f"{shard.micro_batch_size}: need at least {need}; give more data or use a smaller "
            "micro-batch size (or block size)"
        )
    return per_epoch


def train_indices(
    num_examples: int, shard: Shard, *, seed: int, start: int = 0, per_epoch: int | None = None
) -> Iterator[np.ndarray]:
    """Endless example indices, one array of ``micro_batch_size`` per micro-batch, for this replica.

    start: micro-batches to skip (counted from the first epoch) without computing them, for exact resume.
    per_epoch: micro-batches per epoch (default: every whole micro-batch of the data).
    """
    if seed < 0 or start < 0:
        raise PptkError(f"seed ({seed}) and start ({start}) must be >= 0")
    per_epoch = per_epoch or micro_batches_per_epoch(num_examples, shard)
    # Validation above runs at call time; the generator below only starts on the first next().
    return _indices(
        num_examples, shard, seed=seed, epoch=start // per_epoch, first=start % per_epoch, per_epoch=per_epoch
    )


def _indices(
    num_examples: int, shard: Shard, *, seed: int, epoch: int, first: int, per_epoch: int
) -> Iterator[np.ndarray]:
    size = shard.micro_batch_size
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(num_examples)
        for i in range(first, per_epoch):
            begin = (i * shard.dp_size + shard.dp_rank) * size
            yield order[begin : begin + size]
        epoch, first = epoch + 1, 0


def eval_indices(lengths: list[int], shard: Shard) -> list[np.ndarray]:
    """This replica's share of a whole evaluation set, as micro-batches of indices; every example used once.

    Sorted by length (less padding) and dealt round-robin to the replicas; every replica gets the same number of
    micro-batches (DeepSpeed's eval_batch needs that), holding micro_batch_size examples or a few more.
    """
    if len(lengths) < shard.dp_size:
        raise PptkError(
            f"{len(lengths)} evaluation examples cannot be shared by {shard.dp_size} data-parallel "
            "replicas; give more evaluation data"
        )
    by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])
    mine = np.array(by_length[shard.dp_rank :: shard.dp_size])
    count = min(-(-len(lengths) // shard.examples_per_micro_batch), len(lengths) // shard.dp_size)
    return list(np.array_split(mine, count))


def sample_positions(shard: Shard, *, start: int = 0) -> Iterator[np.ndarray]:
    """Endless global sample indices, one array of ``micro_batch_size`` per micro-batch, for this replica.

    Micro-batch ``i`` of replica ``r`` holds samples ``(i * dp_size + r) * micro_batch_size + [0, micro_batch_size)``,
    so step ``s`` covers samples ``[s * global_batch, (s + 1) * global_batch)`` on every layout with that global
    batch. Tasks that map a sample index to data themselves (prepared token sets) use this in place of
    ``train_indices``: no per-epoch permutation is held in memory.
    """
    if start < 0:
        raise PptkError(f"start ({start}) must be >= 0")
    size = shard.micro_batch_size
    i = start
    while True:
        begin = (i * shard.dp_size + shard.dp_rank) * size
        yield np.arange(begin, begin + size, dtype=np.int64)
        i += 1
