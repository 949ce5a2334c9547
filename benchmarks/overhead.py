"""Step time of the same model and batch: DeepSpeed's pipeline engine at pp=1 vs the plain Hugging Face model.

Both run in this one process, interleaved step by step so that machine noise hits both alike; the ratio of the
median step times is printed and written to benchmarks/results/overhead.json. Target: within 3% (ratio <= 1.03).

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/overhead.py            # CPU, fp32
    python benchmarks/overhead.py --steps 50 --hidden 1024 --layers 12           # a GPU machine
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from results_file import write_result

from pptk.launch import free_port

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--output", type=Path, default=RESULTS / "overhead.json")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed
    from transformers import GPT2Config

    from pptk.pipeline import build_pipeline_module, plan_pipeline

    device = "cuda" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu" else "cpu"
    from pptk.engine import init_distributed

    init_distributed()
    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=args.seq_len,
        n_embd=args.hidden,
        n_layer=args.layers,
        n_head=max(1, args.hidden // 64),
        bos_token_id=0,
        eos_token_id=0,
    )
    plan = plan_pipeline(config, num_stages=1, dropout=False)

    torch.manual_seed(0)
    hf_model = plan.hf_class(plan.config).to(device).train()
    hf_optimizer = torch.optim.AdamW(hf_model.parameters(), lr=1e-4)
    pipe = build_pipeline_module(plan)
    pipe_optimizer = torch.optim.AdamW(pipe.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(
        model=pipe,
        optimizer=pipe_optimizer,
        config={
            "train_micro_batch_size_per_gpu": args.micro_batch_size,
            "gradient_accumulation_steps": args.micro_batches,
            "train_batch_size": args.micro_batch_size * args.micro_batches,
            "zero_optimization": {"stage": 0},
            "gradient_clipping": 0.0,
            "steps_per_print": 10**9,
        },
    )

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.micro_batches, args.micro_batch_size, args.seq_len), generator=gen)
    ids = ids.to(device)
    mask = torch.ones_like(ids[0])

    def hf_step() -> None:
        for m in range(args.micro_batches):
            loss = hf_model(input_ids=ids[m], attention_mask=mask, labels=ids[m]).loss
            (loss / args.micro_batches).backward()
        hf_optimizer.step()
        hf_optimizer.zero_grad(set_to_none=True)

    def pipe_step() -> None:
        engine.train_batch(iter([((ids[m], mask), ids[m]) for m in range(args.micro_batches)]))

    def timed(step) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        hf_step()
        pipe_step()
    hf_times, pipe_times = [], []
    for i in range(args.steps):  # alternate which side goes first, so neither always runs on a warmer cache
        order = [(hf_times, hf_step), (pipe_times, pipe_step)]
        for times, step in order if i % 2 == 0 else order[::-1]:
            times.append(timed(step))

    hf_median, pipe_median = statistics.median(hf_times), statistics.median(pipe_times)
    ratio = pipe_median / hf_median
    result = {
        "benchmark": "pipeline engine pp=1 vs plain Hugging Face, same model and batch",
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "config": vars(args) | {"output": str(args.output), "params": hf_model.num_parameters()},
        "hf_step_s_median": hf_median,
        "pipeline_step_s_median": pipe_median,
        "ratio_pipeline_over_hf": ratio,
        "target_ratio": 1.03,
        "within_target": ratio <= 1.03,
        "hf_step_s": hf_times,
        "pipeline_step_s": pipe_times,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.output, result)
    print(
        f"plain HF {hf_median * 1e3:.1f} ms/step, pipeline pp=1 {pipe_median * 1e3:.1f} ms/step: "
        f"ratio {ratio:.3f} ({'within' if ratio <= 1.03 else 'over'} the 1.03 target) -> {args.output}"
    )


if __name__ == "__main__":
    main()
