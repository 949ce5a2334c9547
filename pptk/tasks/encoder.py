# What the example-batch tasks share (BERT's, and decoder classifiers): the model, tokenizer and length limit,
# checked; padded example batches.
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pptk.data.encode import Batch, fill_rows
from pptk.data.sampler import Shard, eval_indices
from pptk.errors import PptkError
from pptk.models import get_family
from pptk.parallel.pipeline import ModelSource, max_positions, resolve_model
from pptk.training.config import RunConfig


def resolve_encoder(
    run: RunConfig, *, max_seq_len: int | None, examples: str, task: str | None = None
) -> tuple[ModelSource, Any, int]:
    """(source, tokenizer, max_len): a BERT model (or, given ``task``, any family with that task), its tokenizer and
    the length limit, checked."""
    from transformers import AutoTokenizer

    if run.model.model is None:
        raise PptkError("give --model: a local Hugging Face model directory")
    source = resolve_model(run.model.model)
    if task is None and source.config.model_type != "bert":
        raise PptkError(f"{run.model.model} is a {source.config.model_type!r} model; this recipe trains BERT")
    if task is not None and task not in (tasks := get_family(source.config.model_type).tasks):
        raise PptkError(
            f"{run.model.model} is a {source.config.model_type!r} model, which supports {', '.join(sorted(tasks))} "
            f"in pptk, not {task}; see `pptk models`"
        )
    positions = max_positions(source.config)
    if positions is None:
        raise PptkError(f"{run.model.model}: config.json has no max_position_embeddings; add it")
    max_len = max_seq_len or positions
    if max_len > positions:
        raise PptkError(
            f"--max-seq-len {max_len} is longer than the model's {positions} positions; use "
            f"--max-seq-len {positions} or less (with --truncate for longer {examples})"
        )
    if run.model.tokenizer is None and source.pretrained_dir is None:
        raise PptkError(
            f"{run.model.model} has no weights and no tokenizer; point --model to a Hugging Face model "
            "directory, or pass --tokenizer for a from-scratch config"
        )
    tokenizer_dir: Path = run.model.tokenizer or source.pretrained_dir  # type: ignore[assignment]
    return source, AutoTokenizer.from_pretrained(tokenizer_dir), max_len


def eval_micro_batches(
    features: Sequence[dict], shard: Shard, collate: Callable[[list[dict]], Batch], *, fixed_shape: bool = False
) -> list[Batch]:
    """This replica's share of the whole evaluation set, every example used once (see ``eval_indices``).

    Each micro-batch is filled to exactly ``micro_batch_size`` examples with unscored rows (``fill_rows``), after
    ``collate`` (so masking sees only the real rows): DualPipeV exchanges activation shapes once, so a short one
    would break it, and every schedule then runs the same micro-batches. ``eval_indices`` deals a few more than
    ``micro_batch_size`` only to keep the replicas' counts equal on tiny sets (fewer than 2 x dp examples, or
    micro-batches of 1); ``fixed_shape`` (DualPipeV) cannot run those.
    """
    lengths = [len(f["input_ids"]) for f in features]
    chunks = eval_indices(lengths, shard)
    # every replica judges every replica's share, so all of them stop here alike rather than some in eval_batch
    shares = (eval_indices(lengths, replace(shard, dp_rank=r)) for r in range(shard.dp_size))
    if fixed_shape and max(len(chunk) for share in shares for chunk in share) > shard.micro_batch_size:
        raise PptkError(
            f"{len(features)} evaluation examples cannot be dealt to dp({shard.dp_size}) replicas in equal numbers "
            f"of micro-batches of {shard.micro_batch_size}, which --schedule dualpipev needs; raise "
            "--micro-batch-size, give more evaluation examples, or use --schedule 1f1b"
        )
    return [fill_rows(collate([features[i] for i in chunk]), rows=shard.micro_batch_size) for chunk in chunks]


def select(features: Sequence[dict], indices: np.ndarray) -> list[dict]:
    return [features[i] for i in indices]
