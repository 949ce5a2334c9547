# Reward models: a one-output sequence classifier trained on preference pairs with the Bradley-Terry loss.
"""``prepare(run)`` reads the pairs (``pptk.data.pairs``: prompt/chosen/rejected strings or chat messages), renders
prompt + chosen and prompt + rejected with the tokenizer's chat template, and checks everything before any rank
starts: a pair missing a side, chosen identical to rejected, a prompt longer than ``--seq-len``, a last token that
Hugging Face would not score. A micro-batch of ``--micro-batch-size`` pairs holds their rows interleaved (chosen,
rejected, chosen, ...), so both sides of a pair always meet in one loss call on the last stage, which computes TRL's
RewardTrainer loss ``-logsigmoid(r_chosen - r_rejected)`` (``pptk.models.heads.bradley_terry_loss``).

Evaluation reports the pairwise accuracy (the share of held-out pairs whose chosen answer scores higher), the mean
margin and the mean chosen and rejected rewards. The export is ``AutoModelForSequenceClassification`` with one label.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pptk.data.pairs import EncodedPair, encode_pairs, read_pairs, split_eval_pairs
from pptk.data.sampler import Shard
from pptk.errors import PptkError
from pptk.models.heads import CHOSEN, REJECTED, config_for_task, last_token_problem
from pptk.parallel.pipeline import ModelSource, PipelinePlan, max_positions
from pptk.parallel.schedules import needs_fixed_shapes
from pptk.tasks.classification import use_pad_token
from pptk.tasks.encoder import eval_micro_batches, resolve_encoder
from pptk.tasks.metrics import pair_metrics
from pptk.training.config import RunConfig
from pptk.training.task_hooks import Batch, Evaluation, replica_mean

TASK = "reward"
DEFAULT_SEQ_LEN = 1024  # capped at the model's positions


@dataclass(frozen=True, kw_only=True)
class RewardSettings:
    train: tuple[Path, ...]
    eval: tuple[Path, ...] = ()
    eval_fraction: float | None = None
    format: str | None = None  # None: detected from each file's first record (pptk.data.pairs.FORMATS)
    chat_template: Path | None = None  # for a tokenizer without one
    seq_len: int | None = None


def prepare(run: RunConfig) -> PreparedReward:
    settings: RewardSettings = run.data
    if run.parallel.schedule and needs_fixed_shapes(run.parallel.schedule):
        raise PptkError(f"--schedule {run.parallel.schedule}: reward training runs under 1f1b (rows change length)")
    source, tokenizer, positions = resolve_encoder(run, max_seq_len=None, examples="pairs", task=TASK)
    seq_len = settings.seq_len or min(DEFAULT_SEQ_LEN, max_positions(source.config) or DEFAULT_SEQ_LEN)
    if seq_len > positions:
        raise PptkError(
            f"--seq-len {seq_len} is longer than the model's {positions} positions; use {positions} or less"
        )
    use_pad_token(tokenizer, label=source.label)
    pairs = read_pairs(settings.train, format=settings.format)
    if settings.eval:
        train, held_out = pairs, read_pairs(settings.eval, format=settings.format)
    elif settings.eval_fraction is not None:
        train, held_out = split_eval_pairs(pairs, eval_fraction=settings.eval_fraction, seed=run.seed)
    else:
        raise PptkError("give held-out pairs: --eval FILE or --eval-fraction F (pairwise accuracy is measured on them)")
    encode = dict(tokenizer=tokenizer, seq_len=seq_len, chat_template=settings.chat_template)
    train_pairs, eval_pairs = encode_pairs(train, **encode), encode_pairs(held_out, **encode)
    _check_rows(train_pairs + eval_pairs, tokenizer=tokenizer, vocab_size=source.config.vocab_size, label=source.label)
    if settings.chat_template is not None:  # saved with hf_config/, so the export carries it
        from pptk.data.chat_template import resolve_chat_template

        tokenizer.chat_template = resolve_chat_template(tokenizer, settings.chat_template).text
    config = config_for_task(source.config, TASK)
    config.pad_token_id = tokenizer.pad_token_id  # Hugging Face scores the last token that is not this one
    return PreparedReward(
        source=ModelSource(config, source.pretrained_dir, source.label),
        tokenizer=tokenizer,
        seq_len=seq_len,
        train=train_pairs,
        eval=eval_pairs,
    )


def _check_rows(pairs: list[EncodedPair], *, tokenizer, vocab_size: int, label: str) -> None:
    for pair in pairs:
        for ids in (pair.chosen_ids, pair.rejected_ids):
            if problem := last_token_problem(ids, pad_token_id=tokenizer.pad_token_id, where=pair.where):
                raise PptkError(problem)
            if max(ids) >= vocab_size:
                raise PptkError(
                    f"{pair.where}: token id {max(ids)} is beyond {label}'s vocabulary of {vocab_size}; resize the "
                    "model's embeddings (model.resize_token_embeddings) and save it, or use the model's own tokenizer"
                )


def pair_rows(pairs: list[EncodedPair], *, pad_id: int) -> Batch:
    """((input_ids, attention_mask), labels) of these pairs, rows interleaved (chosen, rejected, ...), right-padded
    to the longest row; labels CHOSEN / REJECTED."""
    rows = [ids for pair in pairs for ids in (pair.chosen_ids, pair.rejected_ids)]
    length = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    labels = torch.tensor([CHOSEN, REJECTED] * len(pairs), dtype=torch.long)
    return (input_ids, attention_mask), labels


class RewardRecorder:
    """The pipeline's loss function; during an evaluation it also keeps each micro-batch's (chosen, rejected) rewards
    (on the last stage, which sees every micro-batch; eval_batch returns only the last one's outputs)."""

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.loss_fn = loss_fn
        self.records: list[tuple[list[float], list[float]]] | None = None

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.records is not None:
            rewards = logits.detach().float().reshape(len(labels), -1)[:, 0]
            self.records.append((rewards[labels == CHOSEN].tolist(), rewards[labels == REJECTED].tolist()))
        return self.loss_fn(logits, labels)

    @contextmanager
    def recording(self):
        self.records = []
        try:
            yield self.records
        finally:
            self.records = None


@dataclass
class PreparedReward:
    source: ModelSource  # num_labels=1, pad_token_id the tokenizer's
    tokenizer: Any
    seq_len: int
    train: list[EncodedPair]
    eval: list[EncodedPair]
    task: str = TASK
    dynamic_shape: bool = True  # every micro-batch is padded to its own longest row
    recorder: RewardRecorder | None = None
    lengths: set[int] = field(default_factory=set)

    @property
    def num_train_examples(self) -> int:
        return len(self.train)

    def describe(self) -> str:
        truncated = sum(p.truncated for p in self.train + self.eval)
        cut = f", {truncated} with an answer cut at --seq-len {self.seq_len}" if truncated else ""
        return f"reward model, {len(self.train)} train / {len(self.eval)} eval pairs (2 rows each){cut}"

    def tokens_per_example(self) -> float:
        return sum(len(p.chosen_ids) + len(p.rejected_ids) for p in self.train) / len(self.train)

    def loss_fn(self, plan: PipelinePlan) -> RewardRecorder:
        self.recorder = RewardRecorder(plan.loss_fn())
        return self.recorder

    def _collate(self, features: list[dict]) -> Batch:
        return pair_rows([f["pair"] for f in features], pad_id=self.tokenizer.pad_token_id)

    def train_batch(self, indices: np.ndarray, number: int, shard: Shard) -> Batch:
        batch = pair_rows([self.train[i] for i in np.asarray(indices).tolist()], pad_id=self.tokenizer.pad_token_id)
        self.lengths.add(int(batch[0][0].shape[1]))
        return batch

    def evaluate(self, engine, shard: Shard, *, max_micro_batches: int) -> Evaluation:
        assert self.recorder is not None, "loss_fn() builds the recorder before the engine exists"
        # dealt by length as the classifiers' examples are (every replica the same number of micro-batches)
        features = [{"input_ids": max(p.chosen_ids, p.rejected_ids, key=len), "pair": p} for p in self.eval]
        batches = eval_micro_batches(features, shard, self._collate)
        with self.recorder.recording() as records:
            loss = engine.eval_batch(iter(batches), num_micro_batches=len(batches))
        mean_loss = replica_mean(float(loss))
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, records)  # only the last stages recorded
        chosen = [value for part in gathered for c, _ in part for value in c]
        rejected = [value for part in gathered for _, r in part for value in r]
        scores = pair_metrics(chosen, rejected)
        metrics = {"eval_pairs": len(chosen), "eval_loss": mean_loss, **{f"eval_{k}": v for k, v in scores.items()}}
        return Evaluation(metrics)

    def summary_extra(self) -> dict[str, Any]:
        return {"train_seq_lens": sorted(self.lengths)}

    def after_export(self, export_dir: Path) -> dict[str, Any]:
        return {}
