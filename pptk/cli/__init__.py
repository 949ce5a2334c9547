# The `pptk` command: one function per subcommand; bad input exits 2 with the problem and the fix.
"""One module per subcommand where it has more than a few lines (``plan``, ``convert``, ``data``, ``env``, ``plot``,
``timeline``; ``common`` and ``run_flags`` for shared flags). This is the only room that sees ``argparse``.

May import: every other room.
"""

from __future__ import annotations

import argparse
import json
import sys

from pptk.logs import quiet_deepspeed_startup

quiet_deepspeed_startup()  # before the imports below bring DeepSpeed in

from pptk.cli import checkpoint, convert, env, plan, plot, timeline  # noqa: E402
from pptk.cli.common import common_model_args  # noqa: E402
from pptk.cli.data import add_data_parser  # noqa: E402
from pptk.cli.lora_flags import add_lora_arguments, lora_settings  # noqa: E402
from pptk.errors import PptkError  # noqa: E402


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
        vocab_parallel=False if args.no_vocab_parallel else None,
        sequence_parallel=args.sequence_parallel,
        selective_checkpointing=args.selective_checkpointing,
    )
    print(result.to_json() if args.json else result.describe())
    return 0 if result.passed else 1


def _default_micro_batches(args: argparse.Namespace) -> int:
    # at least 2: a bad --pp is then reported alone, not as a --micro-batches the user never gave
    return max(2, 2 * args.pp) if args.schedule == "dualpipev" else 2


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pptk",
        description="Pipeline-parallel Hugging Face models on DeepSpeed",
        epilog="Each command's --help ends with an example. Training runs through the recipes (see README).",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=16, width=110),
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("verify", help="one pipeline training step on CPU ranks vs Hugging Face")
    common_model_args(p)
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
    plan.add_parser(sub)
    convert.add_parser(sub)

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
