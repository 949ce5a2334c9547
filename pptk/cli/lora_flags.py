# The LoRA flags of `pptk verify`, `pptk plan` and every recipe: --lora-r turns LoRA on, the others shape it.
from __future__ import annotations

import argparse

from pptk.errors import PptkError
from pptk.parallel.lora import ALL_LINEAR, LoraSettings

# A single --lora-target-modules value with one of these is a regular expression (peft's string form); module names
# never hold them, and a dotted name (attn.c_attn) stays a name.
REGEX_CHARACTERS = frozenset("*+?[](){}|^$\\")
SHAPING_FLAGS = ("lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save")


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LoRA (off unless --lora-r is given)")
    group.add_argument("--lora-r", type=int, default=None, help="adapter rank; turns LoRA on")
    group.add_argument("--lora-alpha", type=float, default=None, help="scaling = alpha / r (default 16)")
    group.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapters' input (default 0)")
    group.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"modules that get an adapter: {ALL_LINEAR} (default: the blocks' linear layers), names or their last "
        "parts (q_proj v_proj, attn.c_attn), or one regular expression a whole Hugging Face module name must match",
    )
    group.add_argument(
        "--lora-modules-to-save",
        nargs="+",
        default=None,
        metavar="NAME",
        help="modules trained in full beside the adapters (a classification head is added for its tasks)",
    )


def lora_settings(args: argparse.Namespace) -> LoraSettings | None:
    """The LoraSettings the flags ask for; None when --lora-r is absent (and no other LoRA flag is given)."""
    from pptk.training.config import check_settings

    check_settings(lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    if args.lora_r is None:
        given = [f"--{name.replace('_', '-')}" for name in SHAPING_FLAGS if getattr(args, name) is not None]
        if given:
            raise PptkError(f"{', '.join(given)} without --lora-r: LoRA is off unless --lora-r (the rank) is given")
        return None
    shaping = {"alpha": args.lora_alpha, "dropout": args.lora_dropout}  # None: LoraSettings' own default
    return LoraSettings(
        r=args.lora_r,
        **{name: value for name, value in shaping.items() if value is not None},
        target_modules=_targets(args.lora_target_modules),
        modules_to_save=tuple(args.lora_modules_to_save or ()),
    )


def _targets(values: list[str] | None) -> str | tuple[str, ...]:
    if not values or values == [ALL_LINEAR]:
        return ALL_LINEAR
    if len(values) == 1 and REGEX_CHARACTERS & set(values[0]):
        return values[0]
    return tuple(values)
