# What several subcommands share: the model argument and the layout flags.
from __future__ import annotations

import argparse

from pptk.parallel.partition import METHODS
from pptk.parallel.schedules import SCHEDULES

MODEL_HELP = "a local Hugging Face dir, a config.json, or a model type (e.g. gpt2) meaning a small random config"
TASK_HELP = (
    "causal-lm | masked-lm | sequence-classification | token-classification; default: the task "
    "config.architectures names (e.g. BertForMaskedLM: masked-lm), or the family's only task"
)


def common_model_args(parser: argparse.ArgumentParser, *, pp_required: bool = True) -> None:
    """pp_required False: `pptk plan --gpus N` chooses pp itself."""
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--pp", type=int, required=pp_required, default=None, help="pipeline stages")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel shards per stage (world = pp * tp * dp)")
    parser.add_argument(
        "--no-vocab-parallel",
        action="store_true",
        help="at --tp > 1, keep the embedding and LM head whole on every tp rank (default: split by vocabulary)",
    )
    parser.add_argument(
        "--selective-checkpointing",
        action="store_true",
        help="recompute each block's attention in the backward, keep the rest",
    )
    parser.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="at --tp > 1, norms and residuals hold S/tp of the sequence (Megatron's sequence parallelism)",
    )
    parser.add_argument("--task", default=None, help=TASK_HELP)
    parser.add_argument("--partition-method", default="compute", help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--schedule", default="1f1b", choices=list(SCHEDULES), help="pipeline schedule")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
