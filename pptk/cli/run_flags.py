# The flags every recipe shares, and how they become a RunConfig (the only place flags meet the library).
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pptk.cli.lora_flags import add_lora_arguments, lora_settings
from pptk.training.config import ModelConfig, OptimConfig, OutputConfig, ParallelConfig, RunConfig


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('layout and optimisation (batch sizes, lr and ZeRO stage fill the JSON\'s "auto")')
    g.add_argument("--pp", type=int, default=2, help="pipeline stages; data-parallel replicas = world size / pp")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel shards per stage (world size = pp * tp * dp)")
    g.add_argument(
        "--no-vocab-parallel",
        action="store_true",
        help="at --tp > 1, keep the embedding and LM head whole on every tp rank (default: split by vocabulary)",
    )
    g.add_argument(
        "--selective-checkpointing",
        action="store_true",
        help="recompute each block's attention in the backward, keep the rest (instead of an interval)",
    )
    g.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="at --tp > 1, norms and residuals hold S/tp of the sequence (Megatron's sequence parallelism)",
    )
    g.add_argument(
        "--ds-config",
        "--deepspeed_config",
        dest="ds_config",
        type=Path,
        default=None,
        help="DeepSpeed JSON (default: ds_configs/pipe_zero1_bf16.json on GPU, pipe_zero1_cpu.json on CPU)",
    )
    g.add_argument("--micro-batch-size", type=int, default=4, help="sequences per micro-batch per rank")
    g.add_argument("--grad-accum-steps", type=int, default=None, help="micro-batches per step (default 2*pp)")
    g.add_argument("--global-batch-size", type=int, default=None, help="alternative to --grad-accum-steps")
    g.add_argument("--zero-stage", type=int, default=None, help="default: the JSON's zero_optimization.stage")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--max-steps", type=int, default=1000, help="with --epochs: cut the run short or stretch it")
    g.add_argument("--epochs", type=int, default=None, help="train this many passes over the data")
    g.add_argument(
        "--loss-spike-factor",
        type=float,
        default=10.0,
        help="a loss above this x the recent median is a bad step: not checkpointed (0: off)",
    )
    g.add_argument("--max-bad-steps", type=int, default=3, help="stop after this many bad steps in a row")
    g.add_argument(
        "--partition-method", default="compute", help="compute | profile | parameters | uniform | type:REGEX"
    )
    g.add_argument("--schedule", default="1f1b", choices=["1f1b", "dualpipev"], help="pipeline schedule")
    g.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: known GPUs)")
    g.add_argument("--activation-checkpoint-interval", type=int, default=0, help="blocks per checkpoint; 0 = off")
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention kernel")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument(
        "--no-dropout",
        action="store_true",
        help="dropout off (deterministic across layouts: resuming on another pp/dp continues the curve)",
    )
    g = parser.add_argument_group("checkpoints and output")
    g.add_argument(
        "--output-dir", type=Path, required=True, help="checkpoints, metrics.jsonl, W&B (shared by all nodes)"
    )
    g.add_argument(
        "--resume-from",
        type=Path,
        default=None,
        help="a pptk checkpoint (runs/x/checkpoints or .../step200); any pp/dp if the global batch is kept",
    )
    g.add_argument(
        "--export-hf",
        type=Path,
        default=None,
        help="after training, export the last checkpoint to this Hugging Face directory (LoRA: the merged model)",
    )
    g.add_argument(
        "--export-adapter",
        type=Path,
        default=None,
        help="LoRA: after training, write the PEFT adapter directory (PeftModel.from_pretrained loads it) here; "
        "it must be new or empty",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --output-dir that already holds a run (its metrics and summary are replaced)",
    )
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--eval-every", type=int, default=200, help="steps between evaluations (epoch runs: every epoch)")
    g.add_argument("--eval-batches", type=int, default=8, help="micro-batches per evaluation (causal-LM)")
    g.add_argument("--eval-at-start", action="store_true", help="also evaluate before training (step 0)")
    g.add_argument("--save-every", type=int, default=500, help="steps between checkpoints; the last step is saved")
    g.add_argument("--wandb-project", default="pptk")
    g.add_argument(
        "--wandb-mode",
        default=None,
        choices=["online", "offline", "disabled"],
        help="default: online when a W&B key is configured, else offline",
    )
    g.add_argument("--log-all-ranks", action="store_true", help="every rank logs, each line prefixed by its rank")
    add_lora_arguments(parser)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher


def parse_with_presets(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, presets: dict[str, dict[str, Any]]
) -> argparse.Namespace:
    """Parse, letting a preset flag (``--demo``) replace the defaults first: flags given explicitly still win."""
    known, _ = parser.parse_known_args(argv)
    for name, defaults in presets.items():
        if getattr(known, name, False):
            parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def run_config(
    args: argparse.Namespace,
    *,
    data: Any,
    task: str | None = None,
    preset: str | None = None,
    sample_prompt: str | None = None,
) -> RunConfig:
    """The RunConfig of a recipe's parsed flags; ``data`` is the task's own data dataclass."""
    return RunConfig(
        model=ModelConfig(
            model=getattr(args, "model", None),
            task=task,
            tokenizer=getattr(args, "tokenizer", None),
            attn_implementation=args.attn,
            dropout=not args.no_dropout,
        ),
        data=data,
        parallel=ParallelConfig(
            pp=args.pp,
            tp=args.tp,
            vocab_parallel=not args.no_vocab_parallel,
            sequence_parallel=args.sequence_parallel,
            selective_checkpointing=args.selective_checkpointing,
            micro_batch_size=args.micro_batch_size,
            grad_accum_steps=args.grad_accum_steps,
            global_batch_size=args.global_batch_size,
            zero_stage=args.zero_stage,
            partition_method=args.partition_method,
            activation_checkpoint_interval=args.activation_checkpoint_interval,
            schedule=args.schedule,
            peak_tflops=args.peak_tflops,
        ),
        optim=OptimConfig(
            ds_config=args.ds_config,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps,
            grad_clip=args.grad_clip,
            max_steps=args.max_steps,
            epochs=args.epochs,
            loss_spike_factor=args.loss_spike_factor,
            max_bad_steps=args.max_bad_steps,
        ),
        output=OutputConfig(
            output_dir=args.output_dir,
            resume_from=args.resume_from,
            export_hf=args.export_hf,
            export_adapter=args.export_adapter,
            log_every=args.log_every,
            eval_every=args.eval_every,
            eval_batches=args.eval_batches,
            eval_at_start=args.eval_at_start,
            save_every=args.save_every,
            wandb_project=args.wandb_project,
            wandb_mode=args.wandb_mode,
            log_all_ranks=args.log_all_ranks,
            sample_prompt=sample_prompt,
            overwrite=args.overwrite,
        ),
        seed=args.seed,
        preset=preset,
        lora=lora_settings(args),
    )
