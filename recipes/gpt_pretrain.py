"""Causal-LM pretraining of a Hugging Face decoder on DeepSpeed's pipeline engine: pipeline stages x ZeRO-1 data
parallelism.

Data is read from prepared sets (`pptk data prepare`: token ids in a memory-mapped file), cut into --seq-len blocks;
text files given to --data are prepared once into <output-dir>/data (or --data-cache) first.

One node, 8 GPUs as 4 pipeline stages x 2 data-parallel replicas:
    deepspeed --num_gpus 8 recipes/gpt_pretrain.py --model models/my-gpt2 --data corpus/*.txt \
        --pp 4 --output-dir runs/gpt

Two nodes (a hostfile with lines "node1 slots=8"; --output-dir on a filesystem every node sees):
    deepspeed --hostfile hostfile --num_nodes 2 --num_gpus 8 --master_addr node1 --master_port 29500 \
        recipes/gpt_pretrain.py --model models/my-gpt2 --data corpus/*.txt --pp 4 --output-dir /shared/runs/gpt

CPU, no GPU (gloo, fp32; what `make demo` runs):
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 recipes/gpt_pretrain.py --demo --output-dir runs/demo

--model takes a local Hugging Face directory (weights load per stage), a config.json, or a model type such as
gpt2 (a small random config). --demo needs no files at all: a small GPT-2 and a byte-level BPE tokenizer trained
on the Python standard library's docstrings; `--demo --model llama` (or any supported decoder type) trains that
family's small config on the same data instead. Batch sizes, learning rate and ZeRO stage fill the DeepSpeed JSON's
"auto" values; a value set in both places must agree. Continued pretraining with LoRA adapters on the frozen model:
add --lora-r 16 (and --export-adapter DIR); see docs/lora.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pptk.cli.run_flags import add_run_flags, parse_with_presets, run_config
from pptk.launch.entry import run_main
from pptk.tasks import causal_lm
from pptk.training.config import RunConfig
from pptk.training.trainer import Trainer

# --demo: what `make demo` trains; any flag given explicitly still wins.
PRESETS = {"demo": dict(max_steps=400, lr=3e-3, micro_batch_size=8, warmup_steps=20, eval_every=100, save_every=200)}
DEMO_PROMPT = "Return the"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="local HF dir, config.json, or model type (e.g. gpt2); with --demo, a model type"
    )
    parser.add_argument(
        "--data",
        nargs="*",
        default=[],
        help="prepared sets (`pptk data prepare`; DIR or DIR:WEIGHT to blend) and/or text files (.txt, .jsonl, "
        ".jsonl.gz, .parquet), which are prepared once into --data-cache",
    )
    parser.add_argument(
        "--data-cache",
        type=Path,
        default=None,
        help="where text files (and --demo's corpus and tokenizer) are prepared, reused by every run that shares it "
        "(default: <output-dir>/data)",
    )
    parser.add_argument(
        "--document-masking",
        action="store_true",
        help="positions restart at document boundaries and attention never crosses them",
    )
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir (default: the model dir)")
    parser.add_argument("--seq-len", type=int, default=None, help="block length (default: the model's positions)")
    parser.add_argument("--eval-fraction", type=float, default=0.05)
    parser.add_argument("--demo", action="store_true", help="the embedded default: small GPT-2, stdlib docstrings")
    add_run_flags(parser)
    args = parse_with_presets(parser, argv, PRESETS)
    if not args.demo and (args.model is None or not args.data):
        parser.error("give --model and --data (or --demo for the embedded default)")
    return args


def build(argv: list[str] | None = None) -> tuple[RunConfig, Callable[[RunConfig], Any]]:
    """The run this command line asks for, and the task that prepares its data."""
    args = parse_args(argv)
    data = causal_lm.CausalLMData(
        files=tuple(Path(d) for d in args.data),
        seq_len=args.seq_len,
        eval_fraction=args.eval_fraction,
        demo=args.demo,
        data_cache=args.data_cache,
        document_masking=args.document_masking,
    )
    run = run_config(
        args,
        data=data,
        task="causal-lm",
        preset="demo" if args.demo else None,
        sample_prompt=DEMO_PROMPT if args.demo else None,
    )
    if args.demo and run.output.export_hf is None:  # the demo ends in a Hugging Face directory
        from dataclasses import replace

        run = replace(run, output=replace(run.output, export_hf=run.output.output_dir / "hf"))
    return run, causal_lm.prepare


def main(argv: list[str] | None = None) -> int:
    Trainer(*build(argv)).fit()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, program="gpt_pretrain"))
