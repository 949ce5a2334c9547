# `pptk checkpoint verify DIR`: every file of a checkpoint against the sizes and checksums its manifest recorded.
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_verify(args: argparse.Namespace) -> int:
    """One summary line and 0, or a PptkError naming the damaged file (``pptk``'s main: one line, exit 2)."""
    from pptk.checkpoints.integrity import check_files
    from pptk.checkpoints.training import find_checkpoint, read_manifest

    tag_dir = find_checkpoint(Path(args.dir))
    checked = check_files(tag_dir, read_manifest(tag_dir))
    print(f"{tag_dir}: {checked.describe()}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    checkpoint = sub.add_parser("checkpoint", help="inspect training checkpoints without loading a model")
    commands = checkpoint.add_subparsers(dest="checkpoint_command", required=True)
    p = commands.add_parser(
        "verify", help="check every file of a checkpoint against the sizes and sha256 checksums saved with it"
    )
    p.add_argument("dir", help="runs/x/checkpoints (the tag its latest names) or a tag, runs/x/checkpoints/step200")
    p.set_defaults(func=cmd_verify)
