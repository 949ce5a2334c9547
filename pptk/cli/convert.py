# `pptk convert`: Hugging Face dir <-> pipeline checkpoint, a layer at a time; a LoRA checkpoint's adapter or merge.
from __future__ import annotations

import argparse
import json

from pptk.cli.common import TASK_HELP


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="Hugging Face dir <-> pipeline checkpoint, a layer at a time")
    p.add_argument(
        "direction",
        choices=["hf-to-ds", "ds-to-hf", "ds-to-adapter"],
        help="ds-to-hf of a LoRA checkpoint writes the merged model (fp32); ds-to-adapter its PEFT adapter directory",
    )
    p.add_argument("src", help="hf-to-ds: a Hugging Face dir; ds-to-hf, ds-to-adapter: runs/x/checkpoints or .../stepN")
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
        "--base",
        default=None,
        help="ds-to-hf of a LoRA checkpoint: the base model dir (default: the one the manifest records)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous export (ds-to-hf) or a destination holding checkpoints (hf-to-ds)",
    )
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from pptk.checkpoints.convert import ds_to_hf, hf_to_ds
    from pptk.checkpoints.lora_convert import export_adapter, export_merged, is_lora_checkpoint
    from pptk.errors import PptkError
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
    elif args.direction == "ds-to-adapter":
        out = export_adapter(args.src, args.dst)
        print(f"wrote {out} (load with PeftModel.from_pretrained(base_model, {str(out)!r}))")
    elif is_lora_checkpoint(args.src):
        out = export_merged(args.src, args.dst, base=args.base, tokenizer=args.tokenizer, overwrite=args.overwrite)
        print(f"wrote {out}: the base with the adapters merged (load with AutoModelFor*.from_pretrained({str(out)!r}))")
    else:
        if args.base is not None:
            raise PptkError("--base is for a LoRA checkpoint (its base model); this checkpoint holds full weights")
        out = ds_to_hf(
            args.src, args.dst, max_shard_size=args.max_shard_size, tokenizer=args.tokenizer, overwrite=args.overwrite
        )
        print(f"wrote {out} (load with AutoModelFor*.from_pretrained({str(out)!r}))")
    return 0
