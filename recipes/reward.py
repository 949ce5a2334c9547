"""Train a reward model on preference pairs on DeepSpeed's pipeline engine: a decoder with a one-output score head.

Data: JSONL or Parquet files of pairs, the format detected from the first record (--format overrides):
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
    {"chosen": [messages], "rejected": [messages]}       (the shared first messages are the prompt)
Each side is rendered as prompt + answer with the tokenizer's chat template (--chat-template FILE when it has none).
The loss is TRL's RewardTrainer loss, -logsigmoid(r_chosen - r_rejected), averaged over the pairs; a micro-batch
of --micro-batch-size pairs holds both rows of each. Evaluation (--eval FILE or --eval-fraction) reports the
pairwise accuracy, the mean margin and the mean chosen and rejected rewards. --export-hf writes a directory that
AutoModelForSequenceClassification loads (num_labels=1): its logit is the reward.

One node, 8 GPUs as 4 pipeline stages x 2 data-parallel replicas, bf16:
    deepspeed --num_gpus 8 recipes/reward.py --model models/Qwen3-1.7B --train pairs.jsonl --eval-fraction 0.05 \
        --pp 4 --ds-config bf16 --seq-len 2048 --micro-batch-size 2 --global-batch-size 64 --lr 1e-5 \
        --epochs 1 --output-dir runs/reward --export-hf runs/reward/hf
CPU (2 ranks = 2 stages, gloo): DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 recipes/reward.py ...
A tokenizer without a pad token pads with its eos token (as TRL does); the score is read at each row's last token.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pptk.cli.run_flags import add_run_flags, run_config
from pptk.data.pairs import FORMATS
from pptk.launch.entry import run_main
from pptk.tasks import reward
from pptk.training.config import RunConfig
from pptk.training.trainer import Trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local Hugging Face decoder directory (weights, tokenizer)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir (default: the model dir)")
    parser.add_argument("--train", type=Path, nargs="+", required=True, help=".jsonl, .jsonl.gz or .parquet files")
    parser.add_argument("--eval", type=Path, nargs="*", default=[], help="held-out files (or --eval-fraction)")
    parser.add_argument("--eval-fraction", type=float, default=None, help="hold out this share of the pairs")
    parser.add_argument("--format", choices=FORMATS, default=None, help="default: detected from the first record")
    parser.add_argument("--chat-template", type=Path, default=None, help="Jinja file, for a tokenizer without one")
    parser.add_argument("--seq-len", type=int, default=None, help="longest row (default: 1024, or the model's)")
    add_run_flags(parser)
    # an epoch-based recipe, as fine-tuning usually is: --max-steps (if given) overrides --epochs
    parser.set_defaults(epochs=1, max_steps=None, lr=1e-5)
    return parser.parse_args(argv)


def build(argv: list[str] | None = None) -> tuple[RunConfig, Callable[[RunConfig], Any]]:
    """The run this command line asks for, and the task that prepares its data."""
    args = parse_args(argv)
    settings = reward.RewardSettings(
        train=tuple(args.train),
        eval=tuple(args.eval),
        eval_fraction=args.eval_fraction,
        format=args.format,
        chat_template=args.chat_template,
        seq_len=args.seq_len,
    )
    return run_config(args, data=settings, task=reward.TASK), reward.prepare


def main(argv: list[str] | None = None) -> int:
    Trainer(*build(argv)).fit()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, program="reward"))
