# The `pptk` command: one function per subcommand; bad input exits 2 with the problem and the fix.
"""One module per subcommand where it has more than a few lines (``data``, ``env``, ``plot``, ``timeline``,
``run_flags`` for the recipes' shared flags). This is the only room that sees ``argparse``.

May import: every other room.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from pptk.logs import quiet_deepspeed_startup

quiet_deepspeed_startup()  # before the imports below bring DeepSpeed in

from pptk.cli import checkpoint, env, plot, timeline  # noqa: E402
from pptk.cli.data import add_data_parser  # noqa: E402
from pptk.cli.lora_flags import add_lora_arguments, lora_settings  # noqa: E402
from pptk.errors import PptkError  # noqa: E402
from pptk.parallel.partition import METHODS  # noqa: E402
from pptk.parallel.schedules import SCHEDULES  # noqa: E402

MODEL_HELP = "a local Hugging Face dir, a config.json, or a model type (e.g. gpt2) meaning a small random config"
TASK_HELP = (
    "causal-lm | masked-lm | sequence-classification | token-classification; default: the task "
    "config.architectures names (e.g. BertForMaskedLM: masked-lm), or the family's only task"
)


def cmd_verify(args: argparse.Namespace) -> int:
    from pptk.verify.run import verify

    result = verify(
        args.model,
        pp=args.pp,
        dp=args.dp,
        tp=args.tp,
        task=args.task,
        micro_batch_size=args.micro_batch_size,
        micro_batches=_default_micro_batches(args) if args.micro_batches is None else args.micro_batches,
        seq_len=args.seq_len,
        zero_stage=args.zero_stage,
        partition_method=args.partition_method,
        attn_implementation=args.attn,
        precision=args.precision,
        schedule=args.schedule,
        allow_missing=args.allow_missing,
        tolerance=args.tolerance,
        seed=args.seed,
        lora=lora_settings(args),
    )
    print(result.to_json() if args.json else result.describe())
    return 0 if result.passed else 1


def _default_micro_batches(args: argparse.Namespace) -> int:
    # at least 2: a bad --pp is then reported alone, not as a --micro-batches the user never gave
    return max(2, 2 * args.pp) if args.schedule == "dualpipev" else 2


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


def cmd_convert(args: argparse.Namespace) -> int:
    from pptk.checkpoints.convert import ds_to_hf, hf_to_ds
    from pptk.training.config import check_settings

    check_settings(pp=args.pp, tp=args.tp)
    if args.direction == "hf-to-ds":
        tag_dir = hf_to_ds(
            args.src,
            args.dst,
            pp=args.pp,
            tp=args.tp,
            task=args.task,
            partition_method=args.partition_method,
            overwrite=args.overwrite,
        )
        task = json.loads((tag_dir / "pptk.json").read_text())["task"]
        print(f"wrote {tag_dir} ({task}; resume with --resume-from {args.dst})")
    else:
        out = ds_to_hf(
            args.src, args.dst, max_shard_size=args.max_shard_size, tokenizer=args.tokenizer, overwrite=args.overwrite
        )
        print(f"wrote {out} (load with AutoModelFor*.from_pretrained({str(out)!r}))")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from pptk.models import get_family, supported_model_types
    from pptk.parallel.tensor_parallel import TP_REFUSED

    rows: list[dict] = [
        {"model_type": t, "tasks": sorted(get_family(t).tasks), "tensor_parallel": t not in TP_REFUSED}
        for t in supported_model_types()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            tp = "tp" if row["tensor_parallel"] else "  "
            print(f"{row['model_type']:<12} {tp}  {', '.join(row['tasks'])}")
        print("tp: supports --tp > 1 (tensor parallelism)")
    return 0


def _common_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--pp", type=int, required=True, help="pipeline stages")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel shards per stage (world = pp * tp * dp)")
    parser.add_argument("--task", default=None, help=TASK_HELP)
    parser.add_argument("--partition-method", default="compute", help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--schedule", default="1f1b", choices=list(SCHEDULES), help="pipeline schedule")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pptk",
        description="Pipeline-parallel Hugging Face models on DeepSpeed",
        epilog="Each command's --help ends with an example. Training runs through the recipes (see README).",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=16, width=110),
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("verify", help="one pipeline training step on CPU ranks vs Hugging Face")
    _common_model_args(p)
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas (world size = pp * dp)")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument(
        "--micro-batches",
        type=int,
        default=None,
        help="micro-batches per step (gradient accumulation); default 2, or 2 * pp for dualpipev",
    )
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="bf16: the shipped bf16 config (BF16_Optimizer) vs Hugging Face in bf16",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="default 1e-5 (fp32, absolute) or 4 (bf16, in units of Hugging Face's own bf16 rounding noise)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="PASS although the checkpoint lacks tensors (or has extra ones) that both sides initialise alike, "
        "e.g. a task head a base model does not have",
    )
    add_lora_arguments(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("plan", help="the layers each stage holds and the memory each rank needs")
    _common_model_args(p)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for the compute cost model")
    p.add_argument("--micro-batch-size", type=int, default=1, help="profile: sequences per timed micro-batch")
    add_lora_arguments(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("convert", help="Hugging Face dir <-> pipeline checkpoint, a layer at a time")
    p.add_argument("direction", choices=["hf-to-ds", "ds-to-hf"])
    p.add_argument("src", help="hf-to-ds: a Hugging Face dir; ds-to-hf: runs/x/checkpoints or .../stepN")
    p.add_argument("dst")
    p.add_argument("--pp", type=int, default=1, help="hf-to-ds: stages to plan for (layer files fit any pp)")
    p.add_argument(
        "--tp", type=int, default=1, help="hf-to-ds: write each layer as tp slice files, as a --tp run saves them"
    )
    p.add_argument("--task", default=None, help="hf-to-ds: " + TASK_HELP)
    p.add_argument("--partition-method", default="compute")
    p.add_argument("--max-shard-size", default="2GB", help="ds-to-hf: shard size, e.g. 500MB (index when sharded)")
    p.add_argument("--tokenizer", default=None, help="ds-to-hf: tokenizer dir (default: the run's hf_config/)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous export (ds-to-hf) or a destination holding checkpoints (hf-to-ds)",
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("models", help="list supported model families and tasks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    checkpoint.add_parser(sub)
    timeline.add_parser(sub)
    plot.add_parser(sub)
    add_data_parser(sub)

    p = sub.add_parser("env", help="the software stack and GPUs against the pins")
    env.add_arguments(p)
    p.set_defaults(func=env.main)
    _add_examples(parser)
    return parser


# One example per subcommand, printed at the end of its --help.
EXAMPLES = {
    "verify": "pptk verify gpt2 --pp 2 --tp 2",
    "plan": "pptk plan llama --pp 4 --tp 2 --dp 2 --precision bf16",
    "convert": "pptk convert ds-to-hf runs/demo/checkpoints runs/demo/hf-again",
    "models": "pptk models --json",
    "checkpoint": "pptk checkpoint verify runs/demo/checkpoints",
    "checkpoint verify": "pptk checkpoint verify runs/demo/checkpoints",
    "timeline": "pptk timeline runs/demo",
    "plot": "pptk plot runs/demo",
    "data": "pptk data prepare corpus.jsonl --tokenizer runs/demo/hf --out data/corpus",
    "data prepare": "pptk data prepare corpus.jsonl --tokenizer runs/demo/hf --out data/corpus",
    "data inspect": "pptk data inspect data/corpus --tokenizer runs/demo/hf",
    "env": "pptk env --quiet",
}


def _subcommands(parser: argparse.ArgumentParser, prefix: str = ""):
    """(name, parser) of every subcommand, nested ones (``data prepare``) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield prefix + name, child
                yield from _subcommands(child, prefix + name + " ")


def _add_examples(parser: argparse.ArgumentParser) -> None:
    for name, child in _subcommands(parser):
        child.formatter_class = argparse.RawDescriptionHelpFormatter
        child.epilog = f"example:\n  {EXAMPLES[name]}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PptkError as err:
        print(f"pptk {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
