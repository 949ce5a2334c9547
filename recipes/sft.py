"""Supervised fine-tuning (SFT) of a Hugging Face decoder on chats, on DeepSpeed's pipeline engine.

Data: JSONL or Parquet files, the format detected from the first record (--format overrides):
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, {"role": "assistant", ...}]}
    {"prompt": "What is 2+2?", "completion": "4"}
    {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"}
Each conversation is rendered with the tokenizer's own chat template (--chat-template FILE when it has none). The
loss covers the assistant answers only, each with its end-of-turn token (--train-on-prompt: every token), averaged
over all answer tokens of the step on every replica, as Hugging Face's Trainer and TRL do. Conversations are packed
into --seq-len rows (positions restart per conversation, attention never crosses one; --no-packing pads instead);
an over-long one is truncated or dropped (--truncation). Held out: --eval FILE or --eval-fraction.

One node, 8 GPUs as 4 pipeline stages x 2 data-parallel replicas, bf16:
    deepspeed --num_gpus 8 recipes/sft.py --model models/Qwen3-8B --train chats.jsonl --eval-fraction 0.02 \
        --pp 4 --ds-config bf16 --seq-len 4096 --micro-batch-size 1 --global-batch-size 64 --lr 1e-5 \
        --epochs 2 --output-dir runs/sft --export-hf runs/sft/hf
Several nodes: add --hostfile hostfile --num_nodes N --master_addr node1 (see recipes/gpt_pretrain.py).

CPU (2 ranks = 2 stages, gloo): DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 recipes/sft.py ...
The export (--export-hf) carries the chat template; at the end it answers a few held-out prompts in the summary.

LoRA (docs/lora.md): add --lora-r 16 [--lora-alpha 32 --lora-target-modules q_proj v_proj] to train adapters on the
frozen model; --export-adapter DIR writes the PEFT adapter directory, --export-hf DIR the merged model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pptk.cli.run_flags import add_run_flags, run_config
from pptk.data.chat import FORMATS
from pptk.data.packing import TRUNCATION
from pptk.launch.entry import run_main
from pptk.tasks import sft
from pptk.training.config import RunConfig
from pptk.training.trainer import Trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local Hugging Face decoder directory (weights, tokenizer)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir (default: the model dir)")
    parser.add_argument("--train", type=Path, nargs="+", required=True, help=".jsonl, .jsonl.gz or .parquet files")
    parser.add_argument("--eval", type=Path, nargs="*", default=[], help="held-out files (or --eval-fraction)")
    parser.add_argument("--eval-fraction", type=float, default=None, help="hold out this share of the conversations")
    parser.add_argument("--format", choices=FORMATS, default=None, help="default: detected from the first record")
    parser.add_argument("--chat-template", type=Path, default=None, help="Jinja file, for a tokenizer without one")
    parser.add_argument("--train-on-prompt", action="store_true", help="loss on every token, not the answers only")
    parser.add_argument("--no-packing", action="store_true", help="one conversation per row, padded")
    parser.add_argument("--truncation", choices=TRUNCATION, default="truncate", help="for conversations > --seq-len")
    parser.add_argument("--seq-len", type=int, default=None, help="row length (default: 2048, or the model's)")
    parser.add_argument("--samples", type=int, default=3, help="held-out prompts the export answers at the end")
    add_run_flags(parser)
    return parser.parse_args(argv)


def build(argv: list[str] | None = None) -> tuple[RunConfig, Callable[[RunConfig], Any]]:
    """The run this command line asks for, and the task that prepares its data."""
    args = parse_args(argv)
    settings = sft.SftSettings(
        train=tuple(args.train),
        eval=tuple(args.eval),
        eval_fraction=args.eval_fraction,
        format=args.format,
        chat_template=args.chat_template,
        train_on_prompt=args.train_on_prompt,
        packing=not args.no_packing,
        truncation=args.truncation,
        seq_len=args.seq_len,
        samples=args.samples,
    )
    return run_config(args, data=settings, task=sft.TASK), sft.prepare


def main(argv: list[str] | None = None) -> int:
    Trainer(*build(argv)).fit()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, program="sft"))
