# Sequence classification (CSV/TSV/JSONL) of an encoder or a decoder, and token classification (CoNLL) of an encoder.
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pptk.data.encode import (
    IGNORE,
    _check_lengths,
    encode_classification,
    encode_tagging,
    is_filler,
    longest,
    pad_batch,
)
from pptk.data.labels import LabelMap, class_label_names, config_with_labels, resolve_labels, tag_label_names
from pptk.data.readers import read_conll, read_text_classification
from pptk.data.sampler import Shard
from pptk.errors import PptkError
from pptk.models import get_family
from pptk.models.heads import hf_model_class, infer_task, last_token_problem
from pptk.parallel.hf_weights import HFCheckpoint, resolve_name
from pptk.parallel.pipeline import ModelSource, PipelinePlan, resolve_model
from pptk.parallel.schedules import needs_fixed_shapes
from pptk.tasks.encoder import eval_micro_batches, resolve_encoder, select
from pptk.tasks.metrics import classification_metrics, tagging_metrics
from pptk.training.config import RunConfig
from pptk.training.task_hooks import Batch, Evaluation, replica_mean

TASKS = ("sequence-classification", "token-classification")


@dataclass(frozen=True, kw_only=True)
class ClassificationData:
    train: Path
    eval: Path
    text_column: str = "text"
    text_pair_column: str | None = None  # second segment of sentence-pair tasks (token type 1)
    label_column: str = "label"
    labels: tuple[str, ...] | None = None  # the label set in id order; default the data's or the checkpoint's
    num_labels: int | None = None  # checked against the label set
    max_seq_len: int | None = None  # default: the model's positions
    truncate: bool = False


def task_for(model: str | Path, requested: str | None) -> str:
    """--task, or the classification task the checkpoint's config.architectures names (checked before any rank
    starts: a base model, which names none, needs --task)."""
    source = resolve_model(model)
    task = infer_task(source.config, requested, source=source.label)
    if task not in TASKS:
        raise PptkError(f"{source.label} is a {task} model; bert_finetune trains {' or '.join(TASKS)}: pass --task")
    return task


def prepare(run: RunConfig, task: str) -> PreparedClassification:
    """Everything that can be wrong with the input, checked before any process group exists."""
    data: ClassificationData = run.data
    source, tokenizer, max_len = resolve_encoder(run, max_seq_len=data.max_seq_len, examples="examples", task=task)
    inputs = get_family(source.config.model_type).input_names
    decoder = "token_type_ids" not in inputs  # its head reads the last token, not BERT's [CLS]
    train_raw: list[Any]  # TaggedSentence for tagging, TextExample for classification
    eval_raw: list[Any]
    if task == "token-classification":
        train_raw, eval_raw = read_conll(data.train), read_conll(data.eval)
        data_names = tag_label_names([t for s in train_raw for t in s.tags])
    else:
        columns = dict(text_column=data.text_column, label_column=data.label_column)
        train_raw = read_text_classification(data.train, **columns, text_pair_column=data.text_pair_column)
        eval_raw = read_text_classification(data.eval, **columns, text_pair_column=data.text_pair_column)
        data_names = class_label_names([e.label for e in train_raw])
    label_map = resolve_labels(
        source.config, data_names, explicit=data.labels, num_labels=data.num_labels, head_rows=_classifier_rows(source)
    )
    encode = encode_tagging if task == "token-classification" else encode_classification
    if decoder:
        encode = encode_for_last_token  # type: ignore[assignment]
        if data.text_pair_column:
            raise PptkError(
                f"--text-pair-column: {source.config.model_type} has no segment ids; join the two texts into one "
                "column (decoder classifiers read one text)"
            )
        use_pad_token(tokenizer, label=source.label)
    train = encode(train_raw, tokenizer, label_map, max_len=max_len, truncate=data.truncate)  # type: ignore[arg-type]
    evaluation = encode(eval_raw, tokenizer, label_map, max_len=max_len, truncate=data.truncate)  # type: ignore[arg-type]
    config = config_with_labels(source.config, label_map)
    if decoder:  # Hugging Face pools the last token that is not this one (saved with the export)
        config.pad_token_id = tokenizer.pad_token_id
    source = ModelSource(config, source.pretrained_dir, source.label)
    pad_to = longest(train, evaluation) if needs_fixed_shapes(run.parallel.schedule) else None
    return PreparedClassification(
        task=task,
        source=source,
        tokenizer=tokenizer,
        seq_len=max_len,
        label_map=label_map,
        train=train,
        eval=evaluation,
        dynamic_shape=pad_to is None,
        pad_to=pad_to,
        num_inputs=len(inputs),
    )


def use_pad_token(tokenizer, *, label: str) -> None:
    """A decoder tokenizer without a pad token pads with eos, as TRL does (Hugging Face's decoder classifiers need a
    pad token for batches of more than one); one without either is an error."""
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is None:
        raise PptkError(
            f"the tokenizer of {label} has neither a pad nor an eos token, and a decoder classifier needs one to find "
            "each row's last token; add a pad token to the tokenizer (tokenizer.add_special_tokens({'pad_token': "
            "'<pad>'}), then save it) and pass it with --tokenizer"
        )
    tokenizer.pad_token = tokenizer.eos_token


def encode_for_last_token(
    examples: list, tokenizer, label_map: LabelMap, *, max_len: int, truncate: bool
) -> list[dict]:
    """Features {input_ids, token_type_ids (zeros, dropped when batched), labels} for a decoder classifier, checked so
    that the pipeline's last real token is the one Hugging Face scores (pptk.models.heads.ScoreHeadPipe)."""
    wheres = [e.where for e in examples]
    ids = tokenizer([e.text for e in examples], truncation=truncate, max_length=max_len, verbose=False)["input_ids"]
    if not truncate:
        _check_lengths([len(row) for row in ids], wheres, max_len=max_len)
    for row, where in zip(ids, wheres):
        if problem := last_token_problem(row, pad_token_id=tokenizer.pad_token_id, where=where):
            raise PptkError(problem)
    return [
        {"input_ids": row, "token_type_ids": [0] * len(row), "labels": label_map.id(e.label, e.where)}
        for row, e in zip(ids, examples)
    ]


def _classifier_rows(source: ModelSource) -> int | None:
    """The output size of a classifier already in the checkpoint (BERT's ``classifier``, a decoder's ``score``)."""
    if source.pretrained_dir is None:
        return None
    checkpoint = HFCheckpoint(source.pretrained_dir)
    hf_class = hf_model_class(source.config, "sequence-classification")
    head = "classifier.weight" if source.config.model_type == "bert" else "score.weight"
    name = resolve_name(head, checkpoint, base_model_prefix=hf_class.base_model_prefix)
    return None if name is None else int(checkpoint.shape(name)[0])


class PredictionRecorder:
    """The pipeline's loss function, also keeping each evaluation micro-batch's predictions and labels.

    DeepSpeed's eval_batch(return_logits=True) returns only the last micro-batch's logits; the loss function sees
    every micro-batch's (on the last stage), so recording there keeps the evaluation pipelined.
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.loss_fn = loss_fn
        self.records: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.records is not None:
            self.records.append((logits.detach().argmax(-1), labels))
        return self.loss_fn(logits, labels)

    @contextmanager
    def recording(self):
        self.records = []
        try:
            yield self.records
        finally:
            self.records = None


def gold_and_predicted(records, *, per_token: bool) -> list[tuple]:
    """(gold, predicted) label ids per real example: ints for classes, lists over scored words for tagging. The
    rows that filled a short micro-batch (``fill_rows``) are dropped."""
    pairs = []
    for predictions, labels in records:
        real = ~is_filler(labels)
        for pred, gold in zip(predictions[real].tolist(), labels[real].tolist()):
            if per_token:
                kept = [(g, p) for g, p in zip(gold, pred) if g != IGNORE]
                pairs.append(([g for g, _ in kept], [p for _, p in kept]))
            else:
                pairs.append((gold, pred))
    return pairs


def report(pairs: list[tuple], label_map: LabelMap, *, per_token: bool) -> tuple[dict, str]:
    names = label_map.names
    if per_token:
        return tagging_metrics([[names[i] for i in g] for g, _ in pairs], [[names[i] for i in p] for _, p in pairs])
    return classification_metrics([g for g, _ in pairs], [p for _, p in pairs], names)


@dataclass
class PreparedClassification:
    task: str
    source: ModelSource  # its config carries the label set
    tokenizer: Any
    seq_len: int
    label_map: LabelMap
    train: list[dict]
    eval: list[dict]
    dynamic_shape: bool = True  # every micro-batch is padded to its own longest example
    lengths: set[int] = field(default_factory=set)
    recorder: PredictionRecorder | None = None
    pad_to: int | None = None  # one length for every micro-batch (DualPipeV sends shapes once)
    num_inputs: int = 3  # the pipeline's inputs: BERT's three, a decoder's (input_ids, attention_mask)

    @property
    def per_token(self) -> bool:
        return self.task == "token-classification"

    @property
    def num_train_examples(self) -> int:
        return len(self.train)

    def describe(self) -> str:
        return (
            f"{self.task}, labels {list(self.label_map.names)}; {len(self.train)} train / {len(self.eval)} "
            "eval examples"
        )

    def tokens_per_example(self) -> float:
        return sum(len(f["input_ids"]) for f in self.train) / len(self.train)

    def loss_fn(self, plan: PipelinePlan):
        self.recorder = PredictionRecorder(plan.loss_fn())
        return self.recorder

    def _collate(self, features: list[dict]) -> Batch:
        inputs, labels = pad_batch(features, pad_id=self.tokenizer.pad_token_id, length=self.pad_to)
        return inputs[: self.num_inputs], labels

    def train_batch(self, indices: np.ndarray, number: int, shard: Shard) -> Batch:
        batch = self._collate(select(self.train, indices))
        self.lengths.add(int(batch[0][0].shape[1]))
        return batch

    def evaluate(self, engine, shard: Shard, *, max_micro_batches: int) -> Evaluation:
        assert self.recorder is not None, "loss_fn() builds the recorder before the engine exists"
        batches = eval_micro_batches(self.eval, shard, self._collate, fixed_shape=self.pad_to is not None)
        with self.recorder.recording() as records:
            loss = engine.eval_batch(iter(batches), num_micro_batches=len(batches))
        mean_loss = replica_mean(float(loss))
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, gold_and_predicted(records, per_token=self.per_token))  # last stages only
        pairs = [pair for part in gathered for pair in part]
        metrics, text = report(pairs, self.label_map, per_token=self.per_token)
        return Evaluation(
            {"eval_examples": len(pairs), "eval_loss": mean_loss, **{f"eval_{k}": v for k, v in metrics.items()}},
            report=text,
        )

    def summary_extra(self) -> dict[str, Any]:
        return {"labels": list(self.label_map.names), "train_seq_lens": sorted(self.lengths)}

    def after_export(self, export_dir: Path) -> dict[str, Any]:
        return {}
