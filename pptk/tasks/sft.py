# Supervised fine-tuning of a decoder on chats: the tokenizer's template, loss on the answers, packed rows.
"""``prepare(run)`` reads and checks the chat files (``pptk.data.sft``) before any rank starts, and hands the
trainer packed (or padded) rows of ``seq_len`` tokens. The loss is Hugging Face's causal-LM loss over the answer
tokens, normalised over the whole step's answer tokens on every replica (``pptk.training.token_mean``), as HF's
Trainer and TRL do. The export is an ``AutoModelForCausalLM`` whose tokenizer carries the chat template; after it,
the exported model answers a few held-out prompts, and the summary prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from pptk.data.packing import ChatRows
from pptk.data.sampler import Shard
from pptk.data.sft import SftData, load_sft_data
from pptk.errors import PptkError
from pptk.parallel.pipeline import ModelSource, PipelinePlan, max_positions, resolve_model
from pptk.training.config import RunConfig
from pptk.training.task_hooks import Batch, Evaluation
from pptk.training.token_mean import TokenMeanLoss, evaluate_token_mean, shifted_items

TASK = "causal-lm"  # what the pipeline computes and the export is: a causal LM
DEFAULT_SEQ_LEN = 2048  # capped at the model's positions


@dataclass(frozen=True, kw_only=True)
class SftSettings:
    train: tuple[Path, ...]
    eval: tuple[Path, ...] = ()
    eval_fraction: float | None = None
    format: str | None = None  # None: detected from each file's first record
    chat_template: Path | None = None  # for a tokenizer without one
    train_on_prompt: bool = False
    packing: bool = True
    truncation: str = "truncate"
    seq_len: int | None = None
    samples: int = 3  # held-out prompts the export answers at the end


def prepare(run: RunConfig) -> PreparedSft:
    from transformers import AutoTokenizer

    settings: SftSettings = run.data
    if run.model.model is None:
        raise PptkError("give --model: a local Hugging Face decoder directory (with its tokenizer)")
    source = resolve_model(run.model.model)
    tokenizer_dir = run.model.tokenizer or source.pretrained_dir
    if tokenizer_dir is None:
        raise PptkError(f"{run.model.model} has no tokenizer; pass --tokenizer DIR")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    positions = max_positions(source.config)
    seq_len = settings.seq_len or min(DEFAULT_SEQ_LEN, positions or DEFAULT_SEQ_LEN)
    if positions is not None and seq_len > positions:
        raise PptkError(
            f"--seq-len {seq_len} is longer than the model's {positions} positions; use {positions} or less"
        )
    data = load_sft_data(
        settings.train,
        tokenizer=tokenizer,
        seq_len=seq_len,
        eval_files=settings.eval,
        eval_fraction=settings.eval_fraction,
        seed=run.seed,
        format=settings.format,
        template_file=settings.chat_template,
        train_on_prompt=settings.train_on_prompt,
        packing=settings.packing,
        truncation=settings.truncation,
    )
    _check_token_ids(data, vocab_size=source.config.vocab_size, label=source.label)
    tokenizer.chat_template = data.template.text  # saved with hf_config/, so the export carries it
    return PreparedSft(source=source, tokenizer=tokenizer, seq_len=seq_len, data=data, samples=settings.samples)


def _check_token_ids(data: SftData, *, vocab_size: int, label: str) -> None:
    """Special tokens added to a tokenizer can lie beyond the model's embedding rows: refuse, do not index past."""
    for rows in (data.train, data.eval):
        if rows is None:
            continue
        for conversation in rows.conversations:
            top = int(conversation.input_ids.max())
            if top >= vocab_size:
                raise PptkError(
                    f"{conversation.where}: token id {top} is beyond {label}'s vocabulary of {vocab_size}; the "
                    "tokenizer has tokens the model lacks (added special tokens?): resize the model's embeddings "
                    "(model.resize_token_embeddings) and save it, or use the model's own tokenizer"
                )


@dataclass
class PreparedSft:
    source: ModelSource
    tokenizer: Any
    seq_len: int
    data: SftData
    samples: int = 3
    task: str = TASK
    dynamic_shape: bool = False
    _loss: TokenMeanLoss | None = None
    _window: list[int] = field(default_factory=lambda: [0, 0])  # conversation tokens, positions since step_metrics
    _extra: dict = field(default_factory=dict)
    vocab_parallel_loss: ClassVar[bool] = True  # the plan's causal-LM loss, token-averaged: vocabulary split at tp > 1

    @property
    def num_train_examples(self) -> int:
        return len(self.data.train)

    def describe(self) -> str:
        return self.data.describe()

    def tokens_per_example(self) -> float:
        return float(self.seq_len)

    def loss_fn(self, plan: PipelinePlan) -> TokenMeanLoss:
        self._loss = TokenMeanLoss(plan.loss_fn(), shifted_items)
        return self._loss

    @property
    def token_mean_loss(self) -> TokenMeanLoss | None:
        """The trainer normalises each step's loss over its answer tokens through this (pptk.training.token_mean)."""
        return self._loss

    def step_metrics(self) -> dict[str, float]:
        """metrics.jsonl / W&B per logged step: the padding fraction of this replica's rows since the last call."""
        if not self._window[1]:
            return {}
        filled, positions = self._window
        self._window = [0, 0]
        return {"padding_fraction": 1.0 - filled / positions}

    def train_batch(self, indices: np.ndarray, number: int, shard: Shard) -> Batch:
        rows = self.data.train
        self._window[0] += sum(rows.filled(i) for i in np.asarray(indices).tolist())
        self._window[1] += len(indices) * rows.seq_len
        return rows.batch(indices)

    def evaluate(self, engine, shard: Shard, *, max_micro_batches: int) -> Evaluation | None:
        """Loss and perplexity over every held-out answer token (up to ``max_micro_batches`` per replica): replicas
        take rows round-robin, and a last micro-batch is filled with rows without a target, which add zero to the
        token-summed loss, so every schedule gets whole micro-batches."""
        held_out, loss_fn = self.data.eval, self._loss
        if held_out is None or loss_fn is None:
            return None
        size = shard.micro_batch_size
        count = min(max_micro_batches, -(-len(held_out) // (shard.dp_size * size)))
        mine = list(range(shard.dp_rank, len(held_out), shard.dp_size))[: count * size]
        batches = [_filled_batch(held_out, mine[i * size : (i + 1) * size], size) for i in range(count)]
        loss = evaluate_token_mean(engine, loss_fn, batches, dp_size=shard.dp_size)
        return Evaluation(
            {
                "eval_loss": loss,
                "eval_perplexity": float(np.exp(min(loss, 50.0))),
            }
        )

    def summary_extra(self) -> dict[str, Any]:
        stats = self.data.train.stats
        return {
            "supervised_tokens": stats.supervised_tokens,
            "padding_fraction": round(stats.padding_fraction, 4),
            "truncated": stats.truncated,
            "dropped": stats.dropped,
            "skipped_no_supervised": stats.skipped_no_supervised,
            **self._extra,
        }

    def after_export(self, export_dir: Path) -> dict[str, Any]:
        prompts = [list(messages) for messages in self.data.sample_prompts[: self.samples]]
        if not prompts:
            return {}
        answers = answer_prompts(export_dir, prompts)
        self._extra["samples"] = answers
        return {"samples": answers}


def _filled_batch(rows: ChatRows, indices: list[int], size: int) -> Batch:
    """Rows ``indices`` plus target-free rows (pad ids, labels -100) up to ``size``."""
    (input_ids, attention, positions), labels = rows.batch(indices + [0] * (size - len(indices)))
    labels[len(indices) :] = -100
    input_ids[len(indices) :] = rows.pad_id
    return (input_ids, attention, positions), labels


def answer_prompts(model_dir: Path, prompts: list[list[dict]], *, new_tokens: int = 32) -> list[dict[str, str]]:
    """The exported model, loaded by transformers alone, answering each prompt through its chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    finally:
        hf_logging.enable_progress_bar()
    answers = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(
                **ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0
            )
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        answers.append({"prompt": messages[-1]["content"], "answer": answer})
    return answers
