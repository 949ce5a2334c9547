# `pptk data prepare`: tokenize a corpus once into a memory-mapped prepared set (see pptk.data.prepare);
# `pptk data inspect`: what a prepared or Megatron set holds (see pptk.data.inspection).
from __future__ import annotations

import argparse
import os
from pathlib import Path


def cmd_prepare(args: argparse.Namespace) -> int:
    from pptk.data.prepare import MEGATRON_INDEX_FILE, prepare_files
    from pptk.logs import setup_logging

    setup_logging()  # prepare says why it rebuilds a damaged set and which leftovers it removes
    result = prepare_files(
        args.inputs,
        tokenizer=args.tokenizer,
        out=args.out,
        workers=args.workers,
        text_field=args.text_field,
        lines_are_documents=args.lines_are_documents,
        progress=True,
        layout=args.format,
    )
    m = result.manifest
    what = "up to date, nothing to do" if result.reused else "wrote"
    megatron = ""
    if m.get("layout") == "megatron":
        megatron = f", or Megatron-LM with --data-path {result.path / Path(MEGATRON_INDEX_FILE).stem}"
    print(
        f"{result.path}: {what} ({m['num_documents']:,} documents, {m['num_tokens']:,} tokens as {m['dtype']}; "
        f"train with --data {result.path}{megatron})"
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pptk.data.inspection import inspect_set

    result = inspect_set(args.path, tokenizer=args.tokenizer)
    print(result.text)
    if result.problem:
        print(f"\n{result.problem}")
        return 1
    return 0


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare data: tokenize once, memory-map in every run")
    commands = data.add_subparsers(dest="data_command", required=True)
    p = commands.add_parser("prepare", help="tokenize text into a prepared set (tokens.bin, documents.idx, manifest)")
    p.add_argument("inputs", nargs="+", type=Path, help=".txt, .jsonl, .jsonl.gz or .parquet files")
    p.add_argument("--tokenizer", type=Path, required=True, help="Hugging Face tokenizer dir (the model's)")
    p.add_argument("--out", type=Path, required=True, help="the prepared set's directory (appears when complete)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizer processes")
    p.add_argument("--text-field", default="text", help=".jsonl / .jsonl.gz / .parquet: the field holding the text")
    p.add_argument(
        "--lines-are-documents", action="store_true", help=".txt: every non-blank line is a document (default: a file)"
    )
    p.add_argument(
        "--format",
        choices=("pptk", "megatron"),
        default="pptk",
        help="megatron: OUT/tokens.bin + OUT/tokens.idx, Megatron-LM's indexed dataset (its --data-path OUT/tokens), "
        "with pptk's manifest beside them",
    )
    p.set_defaults(func=cmd_prepare)
    i = commands.add_parser("inspect", help="show a set's counts, dtype, documents, tokens and first document")
    i.add_argument("path", type=Path, help="a prepared directory, or a Megatron set's PREFIX (PREFIX.bin, PREFIX.idx)")
    i.add_argument("--tokenizer", type=Path, help="decode the first document and check the set against this tokenizer")
    i.set_defaults(func=cmd_inspect)
