# `pptk plan`: the layers each stage holds and the training memory each rank needs.
from __future__ import annotations

import argparse
import dataclasses
import json

from pptk.cli.common import common_model_args
from pptk.cli.lora_flags import add_lora_arguments, lora_settings
from pptk.errors import PptkError


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="the layers each stage holds and the memory each rank needs")
    common_model_args(p)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for the compute cost model")
    p.add_argument("--micro-batch-size", type=int, default=1, help="profile: sequences per timed micro-batch")
    add_lora_arguments(p)
    p.set_defaults(func=cmd_plan)


# Training memory per parameter with Adam under DeepSpeed 0.19.8's ZeRO-1 wrappers, as (held whole by every replica,
# split over dp by ZeRO-1). Measured on CPU ranks by benchmarks/plan_memory.py (weights, gradients, DeepSpeed's
# flat gradient buffers; fp32 master copy and Adam moments), not counted from a list: the wrappers keep more than
# the textbook 2 + 2 + 12, and the allocator's share shows too. fp16 cannot run on these CPUs: modelled as fp32's
# split with 2-byte weights and gradients.
TRAIN_BYTES = {"fp32": (14.0, 18.0), "bf16": (13.0, 12.0), "fp16": (8.0, 18.0)}
# A weight LoRA freezes costs its bytes alone: no gradient, no optimizer state (DeepSpeed casts it to the precision).
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}


def bytes_per_param(precision: str, *, dp: int, zero_stage: int) -> float:
    """Training memory per parameter a rank holds (activations excluded): see TRAIN_BYTES."""
    whole, split = TRAIN_BYTES[precision]
    return whole + split / (dp if zero_stage >= 1 else 1)


def cmd_plan(args: argparse.Namespace) -> int:
    from pptk.parallel.lora import lora_layout_problems
    from pptk.parallel.lora_plan import lora_parameters_per_layer
    from pptk.parallel.pipeline import plan_pipeline
    from pptk.training.config import check_settings

    # the numbers and the layout checked as verify and the recipes check them, before a model is built
    check_settings(
        schedule=args.schedule,
        pp=args.pp,
        tp=args.tp,
        dp=args.dp,
        zero_stage=args.zero_stage,
        micro_batch_size=args.micro_batch_size,
        seq_len=args.seq_len,
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
        micro_batch_size=args.micro_batch_size,
        tp=args.tp,
    )
    per_param = bytes_per_param(args.precision, dp=args.dp, zero_stage=args.zero_stage)
    rows = plan.stages.summary()
    lora_counts = lora_parameters_per_layer(plan.layers, lora, task=plan.task) if lora is not None else None
    for row in rows:
        row["params_per_rank"] = _tp_share(plan, row, args.tp)
        row["train_state_gib"] = row["params_per_rank"] * per_param / 2**30
        if lora_counts is not None:  # frozen weights at their bytes alone, adapters and modules_to_save in full
            held = [lora_counts[c.index] for c in plan.stages.stage_layers(row["stage"])]
            adapters, full = sum(c.adapters for c in held), sum(c.trained_in_full for c in held)
            row["lora_trained_params"] = adapters + full
            frozen_bytes = (row["params_per_rank"] - full) * WEIGHT_BYTES[args.precision]
            row["train_state_gib"] = (frozen_bytes + (adapters + full) * per_param) / 2**30
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
                    "stages": rows,
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
    print(
        f"training memory per rank: weights, grads, Adam and DeepSpeed's buffers ({args.precision}, "
        f"ZeRO-{args.zero_stage} over dp={args.dp}"
        + (f", blocks split over tp={args.tp}, embeddings and head replicated" if args.tp > 1 else "")
        + "), activations not included:"
    )
    if lora is not None:
        trained = sum(row["lora_trained_params"] for row in rows)
        print(
            f"  LoRA r={lora.r}: {trained:,} parameters train (adapters and modules_to_save, at the full cost above); "
            f"the frozen weights cost {WEIGHT_BYTES[args.precision]:g} bytes each"
        )
    for rank in range(args.pp):
        gib = sum(row["train_state_gib"] for row in rows if row["rank"] == rank)
        label = "rank" if args.schedule == "dualpipev" else "stage"
        print(f"  {label} {rank}: " + (f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"))
    return 0


def _tp_share(plan, row: dict, tp: int) -> float:
    """Parameters one tp rank of this stage holds: blocks split tp ways (their few norm weights, replicated, are
    counted as split too), everything else replicated."""
    blocks = sum(c.params for c in plan.stages.stage_layers(row["stage"]) if c.role == "block")
    return row["params"] - blocks + blocks / tp
