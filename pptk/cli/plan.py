# `pptk plan`: the layers each stage holds and the memory each rank needs; with --gpus, the layouts that fit.
from __future__ import annotations

import argparse
import dataclasses
import json

from pptk.cli.common import common_model_args
from pptk.cli.lora_flags import add_lora_arguments, lora_settings
from pptk.errors import PptkError
from pptk.parallel.advisor import GIB, WEIGHT_BYTES, bytes_per_param

__all__ = ["add_parser", "bytes_per_param", "cmd_plan"]

# Dense peak TFLOP/s per GPU assumed by the advisor's step time (--gpu-tflops overrides): H100 SXM, bf16 / TF32.
DEFAULT_TFLOPS = {"bf16": 989.0, "fp16": 989.0, "fp32": 495.0}
# the advisor's numbers, checked with the rest by pptk.training.config.check_settings
ADVISOR_NUMBERS = ("gpus", "global_batch_size", "gpus_per_node", "top", "mfu", "gpu_tflops")


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="the layers each stage holds and the memory each rank needs")
    common_model_args(p, pp_required=False)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's maximum)")
    p.add_argument(
        "--micro-batch-size", type=int, default=None, help="sequences per micro-batch (default 1; --gpus: 1, 2, 4, 8)"
    )
    p.add_argument("--grad-accum-steps", type=int, default=None, help="micro-batches per step (default 2*pp)")
    p.add_argument("--activation-checkpoint-interval", type=int, default=0, help="blocks per checkpoint; 0 = off")
    add_lora_arguments(p)
    g = p.add_argument_group("layout advisor (instead of --pp/--tp/--dp)")
    g.add_argument("--gpus", type=int, default=None, help="rank every pp x tp x dp layout of N GPUs")
    g.add_argument("--gpu-memory", default="80GB", help="memory per GPU (80GB means 80 GiB)")
    g.add_argument("--global-batch-size", type=int, default=None, help="sequences per step (default 16 per GPU)")
    g.add_argument("--gpu-tflops", type=float, default=None, help="dense peak per GPU (default: H100 SXM's)")
    g.add_argument("--mfu", type=float, default=0.4, help="share of the peak the layers reach (modelled)")
    g.add_argument("--gpus-per-node", type=int, default=8, help="tp stays within a node")
    g.add_argument("--top", type=int, default=10, help="layouts to list of those that fit")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    if args.gpus is not None:
        from pptk.cli.advise import cmd_advise

        return cmd_advise(args)
    if args.pp is None:
        raise PptkError("pass --pp N for one layout's plan, or --gpus N for the layouts that fit N GPUs")
    return _cmd_one_layout(args)


def _cmd_one_layout(args: argparse.Namespace) -> int:
    from pptk.parallel.activations import block_shape
    from pptk.parallel.advisor import LoraCounts, Workload, rank_memory
    from pptk.parallel.lora import lora_layout_problems
    from pptk.parallel.lora_plan import lora_parameters_per_layer
    from pptk.parallel.pipeline import max_positions, plan_pipeline
    from pptk.parallel.recompute import check_one_checkpointing
    from pptk.training.config import check_settings

    micro_batch_size = 1 if args.micro_batch_size is None else args.micro_batch_size
    micro_batches = 2 * args.pp if args.grad_accum_steps is None else args.grad_accum_steps
    # the numbers and the layout checked as verify and the recipes check them, before a model is built
    check_settings(
        schedule=args.schedule,
        pp=args.pp,
        tp=args.tp,
        dp=args.dp,
        zero_stage=args.zero_stage,
        micro_batch_size=micro_batch_size,
        grad_accum_steps=micro_batches,
        seq_len=args.seq_len,
        activation_checkpoint_interval=args.activation_checkpoint_interval,
    )
    lora = lora_settings(args)
    if lora is not None and (problems := lora_layout_problems(tp=args.tp)):
        raise PptkError("; ".join(problems))
    plan = plan_pipeline(
        args.model,
        num_stages=args.pp,
        task=args.task,
        partition_method=args.partition_method,
        seq_len=args.seq_len,
        schedule=args.schedule,
        micro_batch_size=micro_batch_size,
        tp=args.tp,
        vocab_parallel=False if args.no_vocab_parallel else None,
        sequence_parallel=args.sequence_parallel,
        recompute_attention=args.selective_checkpointing,
    )
    check_one_checkpointing(selective=args.selective_checkpointing, interval=args.activation_checkpoint_interval)
    vocab_layers = vocab_layer_indices(plan.layers) if plan.vocab is not None else frozenset()
    positions = max_positions(plan.config) or 2048
    seq_len = min(args.seq_len or positions, positions)  # as plan_pipeline's cost model
    per_param = bytes_per_param(args.precision, dp=args.dp, zero_stage=args.zero_stage)
    rows = plan.stages.summary()
    lora_counts = lora_parameters_per_layer(plan.layers, lora, task=plan.task) if lora is not None else None
    counts = (
        None
        if lora_counts is None
        else LoraCounts(tuple(c.adapters for c in lora_counts), tuple(c.trained_in_full for c in lora_counts))
    )
    for row in rows:
        held = plan.stages.stage_layers(row["stage"])
        split = sum(c.params for c in held if c.role == "block" or c.index in vocab_layers)
        row["params_per_rank"] = row["params"] - split + split / args.tp
        row["train_state_gib"] = row["params_per_rank"] * per_param / GIB
        if counts is not None:  # frozen weights at their bytes alone, adapters and modules_to_save in full
            adapters = sum(counts.adapters[c.index] for c in held)
            full = sum(counts.trained_in_full[c.index] for c in held)
            row["lora_trained_params"] = adapters + full
            frozen_bytes = (row["params_per_rank"] - full) * WEIGHT_BYTES[args.precision]
            row["train_state_gib"] = (frozen_bytes + (adapters + full) * per_param) / GIB
    workload = Workload(
        shape=block_shape(plan.config),
        costs=plan.stages.costs,
        seq_len=seq_len,
        global_batch_size=micro_batches * micro_batch_size * args.dp,
        precision=args.precision,
        lora=counts,
        schedule=args.schedule,
        vocab_layers=vocab_layers,
        sequence_parallel=plan.sequence_parallel,
        recompute_attention=plan.recompute_attention,
    )
    memory = rank_memory(
        plan.stages,
        workload,
        tp=args.tp,
        dp=args.dp,
        zero_stage=args.zero_stage,
        micro_batch_size=micro_batch_size,
        micro_batches=micro_batches,
        checkpoint_interval=args.activation_checkpoint_interval,
    )
    ranks = [
        {
            "rank": r,
            "train_state_gib": t / GIB,
            "activation_gib": a / GIB,
            "optimizer_step_gib": s / GIB,
            "total_gib": total / GIB,
        }
        for r, (t, a, s, total) in enumerate(
            zip(memory.train_state, memory.activations, memory.optimizer_step, memory.totals)
        )
    ]
    activation_setting = {
        "seq_len": seq_len,
        "micro_batch_size": micro_batch_size,
        "micro_batches": micro_batches,
        "activation_checkpoint_interval": args.activation_checkpoint_interval,
        "selective_checkpointing": args.selective_checkpointing,
    }
    if args.json:
        print(
            json.dumps(
                {
                    "model": plan.source.label,
                    "pp": args.pp,
                    "tp": args.tp,
                    "dp": args.dp,
                    "method": args.partition_method,
                    "schedule": args.schedule,
                    "precision": args.precision,
                    "lora": None if lora is None else dataclasses.asdict(lora),
                    "activations": activation_setting,
                    "stages": rows,
                    "ranks": ranks,
                },
                indent=2,
            )
        )
        return 0
    print(
        f"{plan.source.label}: {plan.config.model_type}, {plan.task}, pp={args.pp} tp={args.tp} dp={args.dp} "
        f"(world size {args.pp * args.tp * args.dp}), partition method {args.partition_method!r}, "
        f"schedule {args.schedule}"
    )
    print(plan.stages.describe())
    print_active_parameters(rows)
    print(
        f"training memory per rank: weights, grads, Adam and DeepSpeed's buffers ({args.precision}, "
        f"ZeRO-{args.zero_stage} over dp={args.dp}"
        + (f", blocks split over tp={args.tp}, {_vocab_text(plan)}" if args.tp > 1 else "")
        + f"), plus activations: micro-batch {micro_batch_size} x {seq_len} tokens, {micro_batches} micro-batches "
        + f"per step, {describe_checkpointing(args.activation_checkpoint_interval, args.selective_checkpointing)}:"
    )
    if plan.vocab is not None:
        print(
            "  (the vocabulary split is what causal-LM pretraining and SFT runs get; a DPO run keeps the embedding, "
            "head and logits whole: forecast it with --no-vocab-parallel)"
        )
    if lora is not None:
        trained = sum(row["lora_trained_params"] for row in rows)
        print(
            f"  LoRA r={lora.r}: {trained:,} parameters train (adapters and modules_to_save, at the full cost above); "
            f"the frozen weights cost {WEIGHT_BYTES[args.precision]:g} bytes each"
        )
    label = "rank" if args.schedule == "dualpipev" else "stage"
    for row in ranks:
        on_top = (
            f"activations {gib_text(row['activation_gib'])}"
            if row["activation_gib"] >= row["optimizer_step_gib"]
            else f"the optimizer step {gib_text(row['optimizer_step_gib'])} (after the activations are freed)"
        )
        print(f"  {label} {row['rank']}: {gib_text(row['train_state_gib'])} + {on_top} = {gib_text(row['total_gib'])}")
    return 0


def vocab_layer_indices(layers) -> frozenset[int]:
    from pptk.parallel.vocab_parallel import is_vocab_layer

    return frozenset(index for index, layer in enumerate(layers) if is_vocab_layer(layer))


def _vocab_text(plan) -> str:
    if plan.vocab is None:
        return "embeddings and head replicated"
    text = f"embedding and LM head split by vocabulary ({plan.vocab.padded // plan.vocab.tp:,} rows per rank)"
    return text + (", sequence parallel (norms and residuals hold S/tp)" if plan.sequence_parallel else "")


def describe_checkpointing(interval: int, selective: bool = False) -> str:
    if selective:
        return "each block's attention recomputed (selective checkpointing)"
    if interval == 0:
        return "no activation checkpointing"
    return f"activation checkpointing every {interval} block{'s' if interval > 1 else ''}"


def gib_text(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def print_active_parameters(rows: list[dict]) -> None:
    """Mixture-of-experts stages: what each holds and what one token's compute touches (its active experts)."""
    if all(row.get("active_params", row["params"]) == row["params"] for row in rows):
        return
    print("parameters per stage, held and active per token (mixture of experts):")
    for row in rows:
        active = row.get("active_params", row["params"])
        print(f"  stage {row['stage']}: {row['params']:,} held, {active:,} active ({active / row['params']:.0%})")
