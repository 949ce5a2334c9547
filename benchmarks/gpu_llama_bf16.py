"""Throughput and peak memory of a LLaMA-style decoder training in bf16 on DeepSpeed's pipeline engine (GPUs).

A random LLaMA config (default hidden 1024, 8 layers, 16 heads / 4 key-value heads, vocabulary 32000, 1024-token
sequences) goes through pptk's decoder adapter and trains with ds_configs/pipe_zero1_bf16.json (AdamW, ZeRO-1) on
random tokens. Tokens/s over the timed steps and each rank's torch.cuda.max_memory_allocated go to
benchmarks/results/gpu_llama_bf16.json.

Two GPUs, two pipeline stages:
    deepspeed --num_gpus 2 benchmarks/gpu_llama_bf16.py
One GPU (pp=1):
    deepspeed --num_gpus 1 benchmarks/gpu_llama_bf16.py --pp 1
Bigger or longer:
    deepspeed --num_gpus 2 benchmarks/gpu_llama_bf16.py --hidden 2048 --layers 16 --seq-len 2048 --steps 50

Without CUDA it stops with a message. `--smoke` checks the script itself on CPU ranks (tiny model, fp32, gloo):
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 benchmarks/gpu_llama_bf16.py --smoke \
        --output /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
SMOKE = dict(hidden=64, layers=4, heads=4, kv_heads=2, vocab=256, seq_len=32, steps=4, warmup=1, micro_batch_size=2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    from pptk.train import add_training_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads (grouped-query attention)")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 2.75 x hidden)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels)")
    parser.add_argument("--output", type=Path, default=RESULTS / "gpu_llama_bf16.json")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU ranks: checks the script, not speed")
    add_training_arguments(parser)  # --pp, --micro-batch-size, --grad-accum-steps, --ds-config, --lr, ...
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
    if "output_dir" not in given:  # the shared flags require one; this benchmark saves nothing there
        argv = [*argv, "--output-dir", str(RESULTS / "gpu_llama_bf16_run")]
    if "pp" not in given:
        argv = [*argv, "--pp", str(min(2, int(os.environ.get("WORLD_SIZE", "1"))))]
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            if name not in given:
                setattr(args, name, value)
        args.ds_config = args.ds_config or ROOT / "ds_configs" / "pipe_zero1_cpu.json"
    args.max_steps = args.warmup + args.steps  # the learning-rate schedule spans the run
    return args


def llama_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       intermediate_size=args.intermediate or int(2.75 * args.hidden) // 64 * 64,
                       max_position_embeddings=args.seq_len, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False)


def random_batches(*, vocab: int, seq_len: int, micro_batch_size: int, count: int, seed: int):
    """A cycle of (inputs, labels) micro-batches; only the first stage reads inputs and only the last reads labels."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (micro_batch_size, seq_len), generator=gen)
        batches.append(((ids, torch.ones_like(ids)), ids))
    while True:
        yield from batches


def main(argv: list[str]) -> int:
    smoke = "--smoke" in argv
    if not smoke and (os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()):
        print("gpu_llama_bf16: no CUDA device here (torch.cuda.is_available() is False or DS_ACCELERATOR=cpu); this "
              "benchmark measures GPU throughput and memory. Run it on a GPU machine: "
              "`deepspeed --num_gpus 2 benchmarks/gpu_llama_bf16.py` (or --num_gpus 1 ... --pp 1); "
              "`--smoke` checks the script on CPU.", file=sys.stderr)
        return 2
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)  # also runs as a plain `python benchmarks/gpu_llama_bf16.py --pp 1`
    if "MASTER_PORT" not in os.environ:
        from pptk.launch import free_port

        os.environ["MASTER_PORT"] = str(free_port())

    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from pptk.ds_config import precision_of
    from pptk.pipeline import count_parameters, plan_pipeline
    from pptk.train import build_engine, default_ds_config, init_distributed, resolve_ds_config

    args = parse_args(argv)
    ds_config, layout = resolve_ds_config(args)
    precision = precision_of(ds_config)
    if not smoke and precision != "bf16":
        print(f"gpu_llama_bf16: {args.ds_config} trains in {precision}; this benchmark is for bf16 "
              "(ds_configs/pipe_zero1_bf16.json, the default on GPUs)", file=sys.stderr)
        return 2
    init_distributed()
    rank = dist.get_rank()
    plan = plan_pipeline(llama_config(args), num_stages=layout.pp, dropout=False, seq_len=args.seq_len)
    engine = build_engine(plan, layout=layout, ds_config=ds_config, args=args)
    on_gpu = get_accelerator().device_name() == "cuda"
    device = torch.device(get_accelerator().current_device_name())
    if rank == 0:
        print(f"{layout.describe()}; {precision}\n{plan.stages.describe()}", flush=True)

    batches = random_batches(vocab=args.vocab, seq_len=args.seq_len, micro_batch_size=layout.micro_batch_size,
                             count=layout.grad_accum_steps * 2, seed=args.seed + engine.grid.get_data_parallel_rank())
    losses = [float(engine.train_batch(batches)) for _ in range(args.warmup)]
    if on_gpu:
        torch.cuda.synchronize(device)
    dist.barrier()
    step_s = []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(float(engine.train_batch(batches)))  # returns once the step is done on this stage
        if on_gpu:
            torch.cuda.synchronize(device)
        step_s.append(time.perf_counter() - start)
    dist.barrier()
    if not all(math.isfinite(loss) for loss in losses):
        raise RuntimeError(f"non-finite loss during the benchmark: {losses}")

    peak = torch.cuda.max_memory_allocated(device) if on_gpu else 0
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {"rank": rank, "stage": engine.stage_id, "peak_memory_bytes": peak,
                                      "dp_rank": engine.grid.get_data_parallel_rank(),
                                      "parameters": count_parameters(engine.module), "step_s": sum(step_s)})
    if rank == 0:
        elapsed = max(r["step_s"] for r in per_rank)  # the slowest stage sets the pace
        tokens = layout.global_batch_size * args.seq_len * args.steps
        import transformers

        result = {
            "benchmark": "LLaMA-style decoder, bf16 training steps on DeepSpeed's pipeline engine (pptk)",
            "smoke": smoke,
            "device": torch.cuda.get_device_name(device) if on_gpu else platform.processor() or "cpu",
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                         "transformers": transformers.__version__},
            "model": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "vocab", "seq_len")}
            | {"intermediate": plan.config.intermediate_size, "attn_implementation": plan.config._attn_implementation,
               "parameters": sum(r["parameters"] for r in per_rank if r["dp_rank"] == 0)},  # untied: no double count
            "layout": layout.describe(),
            "precision": precision,
            "ds_config": str(args.ds_config or default_ds_config()),
            "stages": plan.stages.summary(),
            "steps": args.steps,
            "warmup_steps": args.warmup,
            "tokens_per_step": layout.global_batch_size * args.seq_len,
            "tokens_per_s": tokens / elapsed,
            "step_s_median": sorted(step_s)[len(step_s) // 2],
            "peak_memory_gib_per_rank": [round(r["peak_memory_bytes"] / 2**30, 3) for r in per_rank],
            "peak_memory_gib_max": round(max(r["peak_memory_bytes"] for r in per_rank) / 2**30, 3),
            "loss_first": losses[0],
            "loss_last": losses[-1],
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{result['tokens_per_s']:,.0f} tokens/s; peak memory {result['peak_memory_gib_max']} GiB "
              f"(per rank {result['peak_memory_gib_per_rank']}); written to {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    from pptk.errors import PptkError

    try:
        sys.exit(main(sys.argv[1:]))
    except PptkError as err:  # a layout or config the user can fix: the message says how
        print(f"gpu_llama_bf16: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
