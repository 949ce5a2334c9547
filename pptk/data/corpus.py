# A run's pretraining corpus: --data entries (prepared sets, weights, plain files) -> checked, split, blended blocks.
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pptk.data.blocks import Blend, PreparedSet, blend, check_compatible, is_prepared, open_prepared, split_by_document
from pptk.data.prepare import prepare_files, tokenizer_fingerprint
from pptk.errors import PptkError


@dataclass(frozen=True)
class DataEntry:
    path: Path
    weight: float | None = None  # the set's share of a blend, before normalisation

    def __post_init__(self) -> None:
        # A nan weight passes every comparison, and an inf one normalises to nan: both once trained silently.
        if self.weight is not None and not (math.isfinite(self.weight) and self.weight > 0):
            raise PptkError(
                f"--data {self.path}:{self.weight}: a blend weight must be a finite number > 0 (the set's share of "
                f"the samples), got {self.weight!r}"
            )


def parse_entry(spec: str | Path) -> DataEntry:
    """``PATH`` or ``PATH:WEIGHT`` (a prepared directory or a Megatron set's prefix, with its blending weight)."""
    text = str(spec)
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return DataEntry(Path(text))
        return DataEntry(Path(head), weight)
    return DataEntry(Path(text))


def check_entries_exist(entries: Sequence[str | Path]) -> None:
    """Every --data entry names a file, a directory or a Megatron set (whose prefix is no file itself)."""
    missing = [str(spec) for spec in entries if not _exists(parse_entry(spec).path)]
    if missing:
        raise PptkError(
            f"--data path(s) not found: {', '.join(missing)}; check the paths (a Megatron set is given by its "
            "prefix: PREFIX for PREFIX.bin and PREFIX.idx)"
        )


def _exists(path: Path) -> bool:
    return path.exists() or is_prepared(path)


def collect_sets(
    entries: Sequence[str | Path], *, tokenizer: Any, cache_dir: Path
) -> list[tuple[PreparedSet, float | None]]:
    """Each --data entry as an opened set (a prepared directory or a Megatron prefix); plain files together become
    one set prepared into cache_dir."""
    parsed = [parse_entry(e) for e in entries]
    if not parsed:
        raise PptkError("no --data given; pass prepared directories, Megatron sets (PREFIX) or text files")
    check_entries_exist(entries)
    plain = [e for e in parsed if not is_prepared(e.path)]
    for entry in plain:
        if entry.weight is not None:
            raise PptkError(
                f"--data {entry.path}:{entry.weight}: weights apply to prepared directories and Megatron sets, and "
                f"{str(entry.path)!r} is neither; prepare it first (`pptk data prepare`) or drop the weight"
            )
        if entry.path.is_dir():
            raise PptkError(
                f"--data {str(entry.path)!r} is a directory without a manifest.json; give a prepared set or files"
            )
    sets = [(open_prepared(e.path), e.weight) for e in parsed if is_prepared(e.path)]
    if plain:
        prepared = prepare_files([e.path for e in plain], tokenizer=tokenizer, out=cache_dir)
        sets.append((open_prepared(prepared.path), None))
    weights = [w for _, w in sets]
    if len(sets) > 1 and any(w is None for w in weights) and any(w is not None for w in weights):
        raise PptkError(
            "give a weight to every prepared set of a blend (DIR:WEIGHT or PREFIX:WEIGHT) or to none (sets are then "
            "drawn in proportion to their sizes)"
        )
    return sets


@dataclass(frozen=True, eq=False)
class Corpus:
    train: Blend
    eval: Blend | None
    sets: tuple[PreparedSet, ...]
    eos_id: int

    def describe(self) -> str:
        tokens = sum(s.num_tokens for s in self.sets)
        weights = ", ".join(f"{s.path.name}:{w:.3g}" for s, w in zip(self.sets, self.train.weights))
        eval_blocks = len(self.eval) if self.eval is not None else 0
        return (
            f"{len(self.train)} train / {eval_blocks} eval blocks of {self.train.members[0].block_size} tokens from "
            f"{tokens:,} memory-mapped tokens ({weights})"
        )


def build_corpus(
    sets: Sequence[tuple[PreparedSet, float | None]],
    *,
    tokenizer: Any,
    vocab_size: int,
    block_size: int,
    eval_fraction: float,
    seed: int,
) -> Corpus:
    """Check every set against the tokenizer and model, split each by document, and blend the parts."""
    info = tokenizer_fingerprint(tokenizer)
    for prepared, _ in sets:
        check_compatible(prepared, tokenizer_info=info, vocab_size=vocab_size)
    splits = [split_by_document(p, eval_fraction=eval_fraction, block_size=block_size) for p, _ in sets]
    given = [w for _, w in sets]
    weights = None if any(w is None for w in given) else [float(w) for w in given]  # type: ignore[arg-type]
    train = blend([t for t, _ in splits], weights, seed=seed)
    held_out = [(e, w) for (_, e), w in zip(splits, train.weights) if e is not None]
    evaluation = blend([e for e, _ in held_out], [w for _, w in held_out], seed=seed) if held_out else None
    return Corpus(train, evaluation, tuple(p for p, _ in sets), info["eos_id"])


def document_positions(input_ids: torch.Tensor, *, eos_id: int) -> torch.Tensor:
    """Position ids that restart at 0 after every eos (a new document), per row of [batch, seq] ids."""
    batch, seq = input_ids.shape
    index = torch.arange(seq).expand(batch, seq)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    starts[:, 0] = True
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - last_start


def document_labels(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Labels that never ask a document to predict the next one's first token (-100 where a document starts)."""
    return input_ids.masked_fill(positions == 0, -100)


def sample_ranges(count: int, shard_rank: int, shard_size: int, size: int) -> list[np.ndarray]:
    """Evaluation sample indices: micro-batch i of replica r holds (i * dp + r) * size + [0, size)."""
    return [
        np.arange((i * shard_size + shard_rank) * size, (i * shard_size + shard_rank + 1) * size) for i in range(count)
    ]
