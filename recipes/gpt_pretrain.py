"""Causal-LM pretraining of a Hugging Face decoder on DeepSpeed's pipeline engine: pipeline stages x ZeRO-1 data parallelism.

Text files are tokenized, joined with end-of-text tokens and packed into fixed --seq-len blocks.

One node, 8 GPUs as 4 pipeline stages x 2 data-parallel replicas:
    deepspeed --num_gpus 8 recipes/gpt_pretrain.py --model models/my-gpt2 --data corpus/*.txt \
        --pp 4 --output-dir runs/gpt

Two nodes (a hostfile with lines "node1 slots=8"; --output-dir on a filesystem every node sees):
    deepspeed --hostfile hostfile --num_nodes 2 --num_gpus 8 --master_addr node1 --master_port 29500 \
        recipes/gpt_pretrain.py --model models/my-gpt2 --data corpus/*.txt --pp 4 --output-dir /shared/runs/gpt

CPU, no GPU (gloo, fp32; what `make demo` runs):
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 recipes/gpt_pretrain.py --demo --output-dir runs/demo

--model takes a local Hugging Face directory (weights load per stage), a config.json, or a model type such as
gpt2 (a small random config). --demo needs no files at all: a small GPT-2 and a byte-level BPE tokenizer trained
on the Python standard library's docstrings; `--demo --model llama` (or any supported decoder type) trains that
family's small config on the same data instead. Batch sizes, learning rate and ZeRO stage fill the DeepSpeed JSON's
"auto" values; a value set in both places must agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch.distributed as dist
from transformers import AutoTokenizer, GPT2Config

from pptk.data import LMBlocks, batch_iterator, check_token_ids, demo_corpus, split_train_eval, tokenize_files
from pptk.data import demo_documents, tokenize_texts, train_demo_tokenizer
from pptk.errors import PptkError
from pptk.models import get_adapter
from pptk.pipeline import ModelSource, max_positions, plan_pipeline, resolve_model
from pptk.train import (MetricsLog, add_training_arguments, build_engine, export_hf, init_distributed,
                        resolve_ds_config, resume_step, train)

DEMO = dict(vocab_size=4096, seq_len=64, n_embd=192, n_layer=6, n_head=6, max_steps=300, lr=2e-3,
            micro_batch_size=4, warmup=20)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="local HF dir, config.json, or model type (e.g. gpt2); with --demo, a model type")
    parser.add_argument("--data", nargs="*", type=Path, default=[], help="text files to train on")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir (default: the model dir)")
    parser.add_argument("--seq-len", type=int, default=None, help="block length (default: the model's positions)")
    parser.add_argument("--eval-fraction", type=float, default=0.05)
    parser.add_argument("--demo", action="store_true", help="the embedded default: small GPT-2, stdlib docstrings")
    add_training_arguments(parser)
    args = parser.parse_args(argv)
    if args.demo:
        given = {a for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        defaults = {"--max-steps": ("max_steps", DEMO["max_steps"]), "--lr": ("lr", DEMO["lr"]),
                    "--micro-batch-size": ("micro_batch_size", DEMO["micro_batch_size"]),
                    "--warmup-steps": ("warmup_steps", DEMO["warmup"]), "--seq-len": ("seq_len", DEMO["seq_len"]),
                    "--eval-every": ("eval_every", 100), "--save-every": ("save_every", 150)}
        for flag, (name, value) in defaults.items():
            if flag not in given:
                setattr(args, name, value)
        if args.export_hf is None:
            args.export_hf = args.output_dir / "hf"
    elif args.model is None or not args.data:
        parser.error("give --model and --data (or --demo for the embedded default)")
    return args


def prepare_demo(output_dir: Path) -> tuple[Path, np.ndarray]:
    """Tokenizer and tokens of the embedded corpus, built once (rank 0) and reused from output_dir."""
    tokenizer_dir = output_dir / "tokenizer"
    text = demo_corpus()
    train_demo_tokenizer(text=text, vocab_size=DEMO["vocab_size"], out_dir=tokenizer_dir)
    tokens = tokenize_texts(demo_documents(), AutoTokenizer.from_pretrained(tokenizer_dir))
    return tokenizer_dir, tokens


def demo_config(vocab_size: int, model_type: str | None):
    """The embedded default's model: a ~3.5M-parameter GPT-2, or the small config of another family (--model llama)."""
    if model_type in (None, "gpt2"):
        return GPT2Config(vocab_size=vocab_size, n_positions=DEMO["seq_len"], n_embd=DEMO["n_embd"],
                          n_layer=DEMO["n_layer"], n_head=DEMO["n_head"], bos_token_id=0, eos_token_id=0)
    config = get_adapter(model_type).small_config()
    config.vocab_size = vocab_size
    config.max_position_embeddings = max(DEMO["seq_len"], getattr(config, "max_position_embeddings", 0) or 0)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, name, None) is not None:
            setattr(config, name, 0)
    return config


def load_tokens(args: argparse.Namespace, source: ModelSource | None) -> tuple[Path, np.ndarray]:
    data_dir = args.output_dir / "data"
    if dist.get_rank() == 0:
        data_dir.mkdir(parents=True, exist_ok=True)
        if args.demo:
            tokenizer_dir, tokens = prepare_demo(args.output_dir)
        else:
            tokenizer_dir = args.tokenizer or (source.pretrained_dir or Path(args.model).parent)
            tokens = tokenize_files(args.data, AutoTokenizer.from_pretrained(tokenizer_dir))
        np.save(data_dir / "tokens.npy", tokens)
        (data_dir / "tokenizer_dir").write_text(str(tokenizer_dir))
    dist.barrier()  # the other ranks read what rank 0 prepared
    return Path((data_dir / "tokenizer_dir").read_text()), np.load(data_dir / "tokens.npy")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Everything that can be checked without the others fails here, on every rank alike, before any process group.
    ds_config, layout = resolve_ds_config(args)
    if args.demo and args.model is not None:
        get_adapter(args.model)  # --demo --model llama: the embedded default with another family
    source = None if args.demo else resolve_model(args.model)
    missing = [str(p) for p in args.data if not p.is_file()]
    if missing:
        raise PptkError(f"--data file(s) not found: {', '.join(missing)}; check the paths")
    init_distributed()
    rank = dist.get_rank()
    tokenizer_dir, tokens = load_tokens(args, source)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = demo_config(len(tokenizer), args.model) if args.demo else source.config
    source = ModelSource(config, None, f"demo {config.model_type}") if args.demo else source
    positions = max_positions(config)
    seq_len = args.seq_len or positions
    if positions is not None and seq_len > positions:
        raise PptkError(f"--seq-len {seq_len} is longer than the model's {positions} positions; use --seq-len "
                        f"{positions} or less")
    check_token_ids(tokens, vocab_size=config.vocab_size)

    plan = plan_pipeline(source, num_stages=layout.pp, task="causal-lm", partition_method=args.partition_method,
                         seq_len=seq_len, dropout=not args.no_dropout)
    blocks = LMBlocks.from_tokens(tokens, block_size=seq_len)
    train_blocks, eval_blocks = split_train_eval(blocks, eval_fraction=args.eval_fraction, seed=args.seed)
    engine = build_engine(plan, layout=layout, ds_config=ds_config, args=args)
    start_step = resume_step(engine, plan, layout=layout, args=args)
    dp_rank, dp = engine.grid.get_data_parallel_rank(), layout.dp
    if rank == 0:
        print(f"{source.label}: {layout.describe()}; {len(train_blocks)} train / {len(eval_blocks)} eval blocks "
              f"of {seq_len} tokens\n{plan.stages.describe()}", flush=True)
        (args.output_dir / "hf_config").mkdir(parents=True, exist_ok=True)
        plan.config.save_pretrained(args.output_dir / "hf_config")  # what a later export needs
        tokenizer.save_pretrained(args.output_dir / "hf_config")

    # the data order depends only on the global step, so a resumed run (on any layout) sees what it would have
    train_iter = batch_iterator(train_blocks, micro_batch_size=layout.micro_batch_size, dp_rank=dp_rank,
                                dp_size=dp, seed=args.seed, start_step=start_step * layout.grad_accum_steps)
    can_evaluate = len(eval_blocks) >= layout.micro_batch_size * dp
    eval_batches = partial(batch_iterator, eval_blocks, micro_batch_size=layout.micro_batch_size, dp_rank=dp_rank,
                           dp_size=dp, seed=0) if can_evaluate else None
    if can_evaluate:  # never more micro-batches than each replica's share of the eval blocks
        args.eval_batches = min(args.eval_batches, max(1, len(eval_blocks) // dp // layout.micro_batch_size))

    log = MetricsLog(output_dir=args.output_dir, args=args, config={**vars(args), "layout": layout.describe()},
                     total_steps=args.max_steps)
    summary = train(engine, train_iter, args=args, plan=plan, layout=layout, tokens_per_sample=seq_len,
                    eval_batches=eval_batches, log=log, start_step=start_step)
    summary.wandb_dir = log.close()
    export_hf(args, summary)
    if rank == 0:
        report = {"first_loss": summary.first_loss, "last_loss": summary.last_loss, "steps": summary.steps,
                  "tokens_per_s": round(summary.tokens_per_s, 1), "eval_loss": summary.eval_loss,
                  "checkpoints": str(summary.checkpoint_dir), "metrics": str(summary.metrics_path),
                  "wandb": summary.wandb_dir, "export_hf": str(args.export_hf) if args.export_hf else None}
        (args.output_dir / "summary.json").write_text(json.dumps(report, indent=2))
        print("\n== pptk summary ==")
        print(f"loss {summary.first_loss:.3f} -> {summary.last_loss:.3f} over {summary.steps} steps"
              + (f", eval loss {summary.eval_loss:.3f}" if summary.eval_loss is not None else ""))
        print(f"throughput {summary.tokens_per_s:,.0f} tokens/s")
        print(f"checkpoints  {summary.checkpoint_dir}\nmetrics      {summary.metrics_path}\n"
              f"W&B run      {summary.wandb_dir or 'disabled'}")
        if args.export_hf:
            print(f"HF export    {args.export_hf}  (AutoModelForCausalLM.from_pretrained loads it)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PptkError as err:
        print(f"gpt_pretrain: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
