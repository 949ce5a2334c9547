"""Direct Preference Optimization (DPO) of a Hugging Face decoder on preference pairs, on DeepSpeed's pipeline engine.

Data: JSONL or Parquet files of pairs, TRL's formats, detected from the first record (--format overrides):
    {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}                                   standard
    {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}   conversational
    {"chosen": [user turn, assistant turn], "rejected": [user turn, other assistant turn]}        implicit-prompt
Each side is rendered with the tokenizer's chat template (--chat-template FILE when it has none), as SFT renders it;
the log-probabilities are summed over the answer tokens (end-of-turn included). The loss is TRL's DPO loss
(--loss-type sigmoid, ipo or hinge; --beta). The reference log-probabilities come from one forward pass before the
first step (start weights; with LoRA the adapters disabled), cached in OUTPUT_DIR/reference_logps.
--micro-batch-size counts pairs: a micro-batch holds twice as many rows.

One node, 8 GPUs as 4 pipeline stages x 2 data-parallel replicas, bf16:
    deepspeed --num_gpus 8 recipes/dpo.py --model runs/sft/hf --train pairs.jsonl --eval-fraction 0.02 \
        --pp 4 --ds-config bf16 --seq-len 2048 --micro-batch-size 1 --global-batch-size 64 --lr 5e-7 \
        --epochs 1 --output-dir runs/dpo --export-hf runs/dpo/hf
Several nodes: add --hostfile hostfile --num_nodes N --master_addr node1 (see recipes/gpt_pretrain.py).

CPU (2 ranks = 2 stages, gloo): DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 recipes/dpo.py ...
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
from pptk.tasks import dpo
from pptk.tasks.dpo_loss import LOSS_TYPES
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
    parser.add_argument("--seq-len", type=int, default=None, help="row length (default: 2048, or the model's)")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta: how far from the reference (TRL: 0.1)")
    parser.add_argument("--loss-type", choices=LOSS_TYPES, default="sigmoid", help="TRL's DPO loss types")
    parser.add_argument(
        "--reference-cache",
        type=Path,
        default=None,
        help="reference log-prob cache dir (default: OUTPUT_DIR/reference_logps)",
    )
    add_run_flags(parser)
    return parser.parse_args(argv)


def build(argv: list[str] | None = None) -> tuple[RunConfig, Callable[[RunConfig], Any]]:
    """The run this command line asks for, and the task that prepares its data."""
    args = parse_args(argv)
    settings = dpo.DpoSettings(
        train=tuple(args.train),
        eval=tuple(args.eval),
        eval_fraction=args.eval_fraction,
        format=args.format,
        chat_template=args.chat_template,
        seq_len=args.seq_len,
        beta=args.beta,
        loss_type=args.loss_type,
        reference_cache=args.reference_cache,
    )
    return run_config(args, data=settings, task=dpo.TASK), dpo.prepare


def main(argv: list[str] | None = None) -> int:
    Trainer(*build(argv)).fit()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, program="dpo"))
