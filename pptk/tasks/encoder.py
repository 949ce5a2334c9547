# What the encoder (BERT) tasks share: the model, tokenizer and length limit, checked; padded example batches.
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pptk.data.encode import Batch
from pptk.data.sampler import Shard, eval_indices
from pptk.errors import PptkError
from pptk.parallel.pipeline import ModelSource, max_positions, resolve_model
from pptk.training.config import RunConfig


def resolve_encoder(run: RunConfig, *, max_seq_len: int | None, examples: str) -> tuple[ModelSource, Any, int]:
    """(source, tokenizer, max_len): a BERT model, its tokenizer and the length limit, checked."""
    from transformers import AutoTokenizer

    if run.model.model is None:
        raise PptkError("give --model: a local Hugging Face BERT directory")
    source = resolve_model(run.model.model)
    if source.config.model_type != "bert":
        raise PptkError(f"{run.model.model} is a {source.config.model_type!r} model; this recipe trains BERT")
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
            f"{run.model.model} has no weights and no tokenizer; point --model to a Hugging Face BERT "
            "directory, or pass --tokenizer for a from-scratch config"
        )
    tokenizer_dir: Path = run.model.tokenizer or source.pretrained_dir  # type: ignore[assignment]
    return source, AutoTokenizer.from_pretrained(tokenizer_dir), max_len


def eval_micro_batches(features: Sequence[dict], shard: Shard, collate: Callable[[list[dict]], Batch]) -> list[Batch]:
    """This replica's share of the whole evaluation set, every example used once (see ``eval_indices``)."""
    return [
        collate([features[i] for i in chunk]) for chunk in eval_indices([len(f["input_ids"]) for f in features], shard)
    ]


def select(features: Sequence[dict], indices: np.ndarray) -> list[dict]:
    return [features[i] for i in indices]
