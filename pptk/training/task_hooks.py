# What a training task hands the trainer: its model, data, loss, evaluation and export extras.
"""A task module (``causal_lm``, ``masked_lm``, ``classification``, ``reward``, ...) has one entry point,
``prepare(run)``. It reads and checks every input on one process, before any process group exists, and returns a
``PreparedTask``.
The trainer owns everything else: layout, engine, sampler, loop, checkpoints, export and the summary. A task
supplies only what differs between tasks:

- the model (``source``: config, with label names where the task has them, and its weights directory);
- how a micro-batch is built from the example indices the sampler picks (``train_batch``);
- the loss function the last stage computes (``loss_fn``), evaluation (``evaluate``), and what it adds to the
  summary and after the export (``summary_extra``, ``after_export``).

Optional methods, called only when a task defines them:
- ``engine_ready(engine, shard)``: on every rank, once the engine exists (and a resumed checkpoint is loaded),
  before the first step: a pass over the data with the starting weights (DPO's reference log-probabilities) goes
  here. It must be collective: every rank calls it, and any ``eval_batch`` it runs runs on all of them.
- ``step_metrics()``: extra numbers for each logged step (SFT's padding fraction).

An optional attribute: ``vocab_parallel_loss = True`` says the task's loss is the plan's causal-LM loss, which reads
vocabulary-split logits at tp > 1 (pptk.parallel.vocab_parallel); without it the vocabulary stays replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pptk.data.sampler import Shard
from pptk.parallel.pipeline import ModelSource, PipelinePlan

# What PipelineEngine.train_batch reads per micro-batch: (inputs, labels), inputs a tuple of int64 tensors.
Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]


@dataclass(frozen=True)
class Evaluation:
    """An evaluation's numbers (logged as they are, keys starting with ``eval_``) and an optional text report."""

    metrics: dict[str, float]
    report: str | None = None


class PreparedTask(Protocol):
    """A task whose inputs were read and checked; everything here is the same on every rank."""

    task: str  # a pptk.models.heads.TASKS name: causal-lm, masked-lm, sequence-classification, reward, ...
    source: ModelSource
    tokenizer: Any
    seq_len: int  # longest sequence a micro-batch can have (the cost model's length)
    num_train_examples: int
    dynamic_shape: bool  # micro-batches change length (DeepSpeed must re-send shapes)

    def describe(self) -> str:
        """One line for the log: the data in numbers."""
        ...

    def tokens_per_example(self) -> float: ...

    def loss_fn(self, plan: PipelinePlan) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]: ...

    def train_batch(self, indices: np.ndarray, number: int, shard: Shard) -> Batch:
        """The micro-batch of these training examples; ``number`` counts this replica's micro-batches from 0."""
        ...

    def evaluate(self, engine: Any, shard: Shard, *, max_micro_batches: int) -> Evaluation | None:
        """Collective over every rank (eval_batch); None when the task has nothing to evaluate on."""
        ...

    def summary_extra(self) -> dict[str, Any]: ...

    def after_export(self, export_dir: Path) -> dict[str, Any]:
        """Run on rank 0 once the Hugging Face export exists (a causal LM prints a greedy sample)."""
        ...


def replica_mean(value: float) -> float:
    """The mean over data-parallel replicas of a value every rank of a replica holds (an eval_batch loss)."""
    import torch.distributed as dist

    total = torch.tensor(float(value), dtype=torch.float64)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()
