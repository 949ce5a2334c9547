# Masked-LM continued pretraining of an encoder, 15% masking split 80/10/10: one example per text line, or packed
# blocks of prepared, memory-mapped token sets (`pptk data prepare`), documents separated by [SEP].
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pptk.data.blocks import is_prepared
from pptk.data.corpus import Corpus, build_corpus, collect_sets, parse_entry, sample_ranges
from pptk.data.encode import IGNORE, encode_lines, longest
from pptk.data.readers import read_lines
from pptk.data.sampler import Shard
from pptk.errors import PptkError
from pptk.parallel.pipeline import ModelSource, PipelinePlan
from pptk.parallel.schedules import needs_fixed_shapes
from pptk.tasks.encoder import eval_micro_batches, resolve_encoder, select
from pptk.training.config import RunConfig
from pptk.training.task_hooks import Batch, Evaluation
from pptk.training.token_mean import TokenMeanLoss, evaluate_token_mean, unshifted_items

TASK = "masked-lm"


@dataclass(frozen=True, kw_only=True)
class MaskedLMData:
    files: tuple[Path, ...]
    eval_files: tuple[Path, ...] = ()  # default: eval_fraction of the lines of `files`
    eval_fraction: float = 0.1
    mlm_probability: float = 0.15
    max_seq_len: int | None = None  # default: the model's positions
    truncate: bool = False


class MaskingCollator:
    """Pads a micro-batch to its longest line and masks it with transformers' collator (80/10/10).

    Seeded: every pipeline stage of a replica masks the same micro-batches identically, so the inputs the first
    stage reads match the labels the last stage reads. A micro-batch where no token was chosen gets one (its first
    ordinary token), so the loss is never a mean over nothing.
    """

    def __init__(self, tokenizer, *, probability: float, seed: int, pad_to: int | None = None):
        from transformers import DataCollatorForLanguageModeling

        self.tokenizer = tokenizer
        # pad_to: every line is at most this long, so padding to a multiple of it pads to exactly it
        self.collator = DataCollatorForLanguageModeling(
            tokenizer, mlm_probability=probability, seed=seed, pad_to_multiple_of=pad_to
        )

    def __call__(self, features: list[dict]) -> Batch:
        batch = self.collator([dict(f) for f in features])
        ids, labels = batch["input_ids"], batch["labels"]
        if not (labels != IGNORE).any():
            special = batch.get("special_tokens_mask")
            ordinary = (
                ~torch.tensor(
                    self.tokenizer.get_special_tokens_mask(ids[0].tolist(), already_has_special_tokens=True),
                    dtype=torch.bool,
                )
                if special is None
                else special[0] == 0
            )
            position = int(ordinary.nonzero()[0]) if ordinary.any() else 0
            labels[0, position] = ids[0, position]
            ids[0, position] = self.tokenizer.mask_token_id
        return (ids, batch["attention_mask"], batch["token_type_ids"]), labels


def masking_seed(seed: int, *parts: int) -> int:
    """A collator seed for one micro-batch: masks depend on (run seed, replica, micro-batch), so a resumed run
    masks exactly as the uninterrupted one did."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])


def prepare(run: RunConfig) -> PreparedMaskedLM | MaskedLMBlocks:
    data: MaskedLMData = run.data
    if not 0 < data.mlm_probability < 1:
        raise PptkError(f"--mlm-probability must be between 0 and 1, got {data.mlm_probability}")
    source, tokenizer, max_len = resolve_encoder(run, max_seq_len=data.max_seq_len, examples="lines")
    if tokenizer.mask_token is None:
        raise PptkError(f"tokenizer {type(tokenizer).__name__} has no mask token; use the model's own tokenizer")
    if any(is_prepared(parse_entry(f).path) for f in data.files):
        return _prepare_blocks(run, source, tokenizer, max_len)
    lines = read_lines(data.files)
    if data.eval_files:
        train_lines, eval_lines = lines, read_lines(data.eval_files)
    else:
        if not 0 < data.eval_fraction < 1:
            raise PptkError(f"--eval-fraction must be between 0 and 1, got {data.eval_fraction}")
        order = np.random.default_rng([run.seed]).permutation(len(lines))
        n_eval = max(1, round(len(lines) * data.eval_fraction))
        train_lines = [lines[i] for i in sorted(order[n_eval:])]
        eval_lines = [lines[i] for i in sorted(order[:n_eval])]
    encode = dict(tokenizer=tokenizer, max_len=max_len, truncate=data.truncate)
    train, evaluation = encode_lines(train_lines, **encode), encode_lines(eval_lines, **encode)
    pad_to = longest(train, evaluation) if needs_fixed_shapes(run.parallel.schedule) else None
    return PreparedMaskedLM(
        source=source,
        tokenizer=tokenizer,
        seq_len=max_len,
        train=train,
        eval=evaluation,
        probability=data.mlm_probability,
        seed=run.seed,
        dynamic_shape=pad_to is None,
        pad_to=pad_to,
    )


@dataclass
class PreparedMaskedLM:
    source: ModelSource
    tokenizer: Any
    seq_len: int
    train: list[dict]
    eval: list[dict]
    probability: float
    seed: int
    task: str = TASK
    dynamic_shape: bool = True  # every micro-batch is padded to its own longest line
    lengths: set[int] = field(default_factory=set)
    _eval_batches: list | None = None
    token_mean_loss: TokenMeanLoss | None = None
    pad_to: int | None = None  # one length for every micro-batch (DualPipeV sends shapes once)

    @property
    def num_train_examples(self) -> int:
        return len(self.train)

    def describe(self) -> str:
        return f"{len(self.train)} train / {len(self.eval)} eval lines"

    def tokens_per_example(self) -> float:
        return sum(len(f["input_ids"]) for f in self.train) / len(self.train)

    def loss_fn(self, plan: PipelinePlan) -> TokenMeanLoss:
        # the mean over every masked token of the step, not of per-micro-batch means (pptk.training.token_mean)
        self.token_mean_loss = TokenMeanLoss(plan.loss_fn(), unshifted_items)
        return self.token_mean_loss

    def train_batch(self, indices: np.ndarray, number: int, shard: Shard) -> Batch:
        collate = MaskingCollator(
            self.tokenizer,
            probability=self.probability,
            seed=masking_seed(self.seed, shard.dp_rank, number),
            pad_to=self.pad_to,
        )
        batch = collate(select(self.train, indices))
        self.lengths.add(int(batch[0][0].shape[1]))
        return batch

    def evaluate(self, engine, shard: Shard, *, max_micro_batches: int) -> Evaluation:
        if self._eval_batches is None:  # built once: the same masks at every evaluation, so the numbers compare
            collate = MaskingCollator(
                self.tokenizer,
                probability=self.probability,
                seed=masking_seed(self.seed, 10_000, shard.dp_rank),
                pad_to=self.pad_to,
            )
            self._eval_batches = eval_micro_batches(self.eval, shard, collate, fixed_shape=self.pad_to is not None)
        batches = self._eval_batches
        loss = evaluate_token_mean(engine, self.token_mean_loss, batches, dp_size=shard.dp_size)
        return Evaluation({"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0)))})

    def summary_extra(self) -> dict[str, Any]:
        return {"train_seq_lens": sorted(self.lengths)}

    def after_export(self, export_dir: Path) -> dict[str, Any]:
        return {}


def _prepare_blocks(run: RunConfig, source: ModelSource, tokenizer: Any, max_len: int) -> MaskedLMBlocks:
    """--data names prepared sets: train on packed blocks of max_len - 2 tokens, each wrapped in [CLS] ... [SEP]."""
    data: MaskedLMData = run.data
    if data.eval_files:
        raise PptkError(
            "--eval-data applies to text lines; with prepared sets the eval split is by document (--eval-fraction)"
        )
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise PptkError(f"tokenizer {tokenizer.name_or_path!r} has no [CLS]/[SEP] tokens; use the model's own")
    sets = collect_sets(data.files, tokenizer=tokenizer, cache_dir=run.output.output_dir / "data")
    corpus = build_corpus(
        sets,
        tokenizer=tokenizer,
        vocab_size=source.config.vocab_size,
        block_size=max_len - 2,
        eval_fraction=data.eval_fraction,
        seed=run.seed,
    )
    return MaskedLMBlocks(
        source=source,
        tokenizer=tokenizer,
        seq_len=max_len,
        corpus=corpus,
        probability=data.mlm_probability,
        seed=run.seed,
    )


@dataclass
class MaskedLMBlocks:
    """Masked-LM on prepared sets: every example is one block, so shapes are fixed (any schedule) and the trainer
    hands global sample positions, as for causal-LM: exact resume and blends work the same way."""

    source: ModelSource
    tokenizer: Any
    seq_len: int
    corpus: Corpus
    probability: float
    seed: int
    task: str = TASK
    dynamic_shape: bool = False
    samples_by_position: bool = True
    _eval_batches: list | None = None
    token_mean_loss: TokenMeanLoss | None = None

    @property
    def num_train_examples(self) -> int:
        return len(self.corpus.train)

    def describe(self) -> str:
        return self.corpus.describe() + " in [CLS] ... [SEP]"

    def tokens_per_example(self) -> float:
        return float(self.seq_len)

    def loss_fn(self, plan: PipelinePlan) -> TokenMeanLoss:
        # the mean over every masked token of the step, not of per-micro-batch means (pptk.training.token_mean)
        self.token_mean_loss = TokenMeanLoss(plan.loss_fn(), unshifted_items)
        return self.token_mean_loss

    def features(self, blocks: torch.Tensor) -> list[dict]:
        """Each block as a tokenizer's encoding: [CLS] block [SEP], one segment, no padding."""
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        return [
            {
                "input_ids": [cls, *row, sep],
                "attention_mask": [1] * (len(row) + 2),
                "token_type_ids": [0] * (len(row) + 2),
            }
            for row in blocks.tolist()
        ]

    def collate(self, blocks: torch.Tensor, seed: int) -> Batch:
        return MaskingCollator(self.tokenizer, probability=self.probability, seed=seed)(self.features(blocks))

    def train_batch(self, indices: np.ndarray, number: int, shard: Shard) -> Batch:
        return self.collate(self.corpus.train.read(indices), masking_seed(self.seed, shard.dp_rank, number))

    def evaluate(self, engine, shard: Shard, *, max_micro_batches: int) -> Evaluation | None:
        held_out = self.corpus.eval
        if held_out is None or len(held_out) < shard.examples_per_micro_batch:
            return None
        if self._eval_batches is None:  # the same blocks and masks at every evaluation, so the numbers compare
            count = min(max_micro_batches, len(held_out) // shard.examples_per_micro_batch)
            samples = sample_ranges(count, shard.dp_rank, shard.dp_size, shard.micro_batch_size)
            self._eval_batches = [
                self.collate(held_out.read(s), masking_seed(self.seed, 10_000, shard.dp_rank, i))
                for i, s in enumerate(samples)
            ]
        batches = self._eval_batches
        loss = evaluate_token_mean(engine, self.token_mean_loss, batches, dp_size=shard.dp_size)
        return Evaluation({"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0)))})

    def summary_extra(self) -> dict[str, Any]:
        return {}

    def after_export(self, export_dir: Path) -> dict[str, Any]:
        return {}
