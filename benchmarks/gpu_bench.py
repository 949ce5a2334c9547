"""`make bench-gpu`: pptk's pipeline against plain Hugging Face under DeepSpeed ZeRO-1, on this machine's GPUs.

One launch of one rank per GPU runs, one after the other on the same model, global batch and bf16 config
(ds_configs/pipe_zero1_bf16.json: BF16_Optimizer, fp32 gradient accumulation, ZeRO-1, FusedAdam):

  pptk-pp1    pptk's PipelineModule, pp=1 x dp=N, DeepSpeed's pipeline engine
  hf-zero1    LlamaForCausalLM under deepspeed.initialize, ZeRO-1 over dp=N (the usual alternative)
  pptk-pp2    with N >= 2 GPUs: pp=2 x dp=N/2, DeepSpeed's 1F1B TrainSchedule (a DualPipeV run joins it once pptk
              has that schedule)

Each reports tokens/s, model TFLOP/s (6 x non-embedding parameters + 12 x layers x hidden x sequence, per token,
the PaLM/Megatron convention, activation recomputation not counted), MFU against the GPU's dense bf16 peak, and
each rank's peak memory; pptk runs also their ratio to hf-zero1. JSON goes to benchmarks/results/gpu_bench.json.

    make bench-gpu                                             # ~1.1B LLaMA, sequence 2048, all GPUs
    python benchmarks/gpu_bench.py --activation-checkpointing  # recompute blocks in the backward pass
    DS_ACCELERATOR=cpu python benchmarks/gpu_bench.py --smoke  # tiny model on 2 CPU ranks: checks the script

Sized to finish in well under 10 minutes on one H100, DeepSpeed's FusedAdam JIT compile included (one launch, so
one compile). It refuses to run without CUDA unless --smoke.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from results_file import write_result

RESULTS = Path(__file__).resolve().parent / "results"
# ~1.1B parameters, LLaMA-shaped (grouped-query attention, SwiGLU MLP, untied head)
# batch_per_gpu: sequences per step per GPU; the global batch is that times the number of GPUs, the same in every run
DEFAULT = dict(
    hidden=2048,
    layers=16,
    heads=32,
    kv_heads=8,
    intermediate=8192,
    vocab=32000,
    seq_len=2048,
    batch_per_gpu=16,
    micro_batch=4,
    steps=10,
    warmup=3,
)
SMOKE = dict(
    hidden=64,
    layers=4,
    heads=4,
    kv_heads=2,
    intermediate=128,
    vocab=256,
    seq_len=32,
    batch_per_gpu=4,
    micro_batch=2,
    steps=2,
    warmup=1,
)
# dense bf16 tensor-core peak per GPU, TFLOP/s (vendor data sheets), by a substring of torch's device name
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}


@dataclass(frozen=True)
class RunSpec:
    name: str
    kind: str  # "pptk" | "hf"
    pp: int
    dp: int
    micro_batch: int
    accum: int


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in DEFAULT.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in the backward")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-GPU bf16 peak for MFU (default: by name)")
    p.add_argument("--smoke", action="store_true", help="tiny model on 2 CPU ranks (bf16): checks the script")
    p.add_argument("--output", type=Path, default=RESULTS / "gpu_bench.json")
    args = p.parse_args(argv)
    for name, value in (SMOKE if args.smoke else DEFAULT).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def plan_runs(world: int, args: argparse.Namespace) -> list[RunSpec]:
    """The same global batch for every run; the pipeline gets enough micro-batches to keep its bubble small."""
    global_batch = args.batch_per_gpu * world

    def accum(micro: int, dp: int) -> int:
        if global_batch % (micro * dp):
            raise SystemExit(f"--batch-per-gpu {args.batch_per_gpu} is not a multiple of --micro-batch {micro}")
        return global_batch // (micro * dp)

    runs = [
        RunSpec("pptk-pp1", "pptk", 1, world, args.micro_batch, accum(args.micro_batch, world)),
        RunSpec("hf-zero1", "hf", 1, world, args.micro_batch, accum(args.micro_batch, world)),
    ]
    if world >= 2 and world % 2 == 0:
        micro = max(1, args.micro_batch // 2)  # more, smaller micro-batches: 1F1B's bubble is (pp-1)/(accum+pp-1)
        runs.append(RunSpec("pptk-pp2", "pptk", 2, world // 2, micro, accum(micro, world // 2)))
    return runs


def llama_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = "sdpa"
    return config


def model_flops_per_token(config, seq_len: int) -> float:
    embedding = config.vocab_size * config.hidden_size
    per_layer = (
        2 * config.hidden_size * config.hidden_size  # q and o projections
        + 2 * config.hidden_size * config.num_key_value_heads * config.hidden_size // config.num_attention_heads
        + 3 * config.hidden_size * config.intermediate_size
        + 2 * config.hidden_size
    )
    non_embedding = config.num_hidden_layers * per_layer + config.hidden_size + embedding  # + norm + LM head
    return 6 * non_embedding + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def _ds_config(spec: RunSpec, args: argparse.Namespace) -> dict:
    from pptk.parallel.layout import Layout
    from pptk.training.ds_config import fill_ds_config, load_ds_config, shipped_config, validate_ds_config

    layout = Layout(pp=spec.pp, dp=spec.dp, micro_batch_size=spec.micro_batch, grad_accum_steps=spec.accum)
    config = fill_ds_config(
        load_ds_config(shipped_config("bf16")),
        layout=layout,
        lr=1e-4,
        weight_decay=0.01,
        warmup_steps=1,
        total_steps=args.warmup + args.steps + 1,
        grad_clip=1.0,
    )
    validate_ds_config(config, layout=layout)
    return config


def _batches(spec: RunSpec, args: argparse.Namespace, *, seed: int):
    gen = torch.Generator().manual_seed(seed)
    cycle = [
        torch.randint(3, args.vocab, (spec.micro_batch, args.seq_len), generator=gen) for _ in range(2 * spec.accum)
    ]
    while True:
        yield from cycle


def _pptk_step(spec: RunSpec, args: argparse.Namespace, config):
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from pptk import deepspeed_compat
    from pptk.parallel.pipeline import build_pipeline_module, plan_pipeline

    plan = plan_pipeline(config, num_stages=spec.pp, dropout=False, seq_len=args.seq_len)
    module = build_pipeline_module(
        plan,
        topology=PipeDataParallelTopology(num_pp=spec.pp, num_dp=spec.dp),
        activation_checkpoint_interval=1 if args.activation_checkpointing else 0,
    )
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=list(module.parameters()), config=_ds_config(spec, args)
    )
    deepspeed_compat.after_initialize(engine)
    batches = (
        (((ids, torch.ones_like(ids)), ids)) for ids in _batches(spec, args, seed=engine.grid.get_data_parallel_rank())
    )
    return engine, lambda: float(engine.train_batch(batches))


def _hf_step(spec: RunSpec, args: argparse.Namespace, config, device):
    import deepspeed
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=list(model.parameters()), config=_ds_config(spec, args)
    )
    batches = _batches(spec, args, seed=dist.get_rank())

    def step() -> float:
        losses = []
        for _ in range(spec.accum):
            ids = next(batches).to(device)
            loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
        return float(torch.stack(losses).mean())

    return engine, step


def _measure(spec: RunSpec, args: argparse.Namespace, device) -> dict:
    import torch.distributed as dist

    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    config = llama_config(args)
    engine, step = _pptk_step(spec, args, config) if spec.kind == "pptk" else _hf_step(spec, args, config, device)
    losses = [step() for _ in range(args.warmup)]
    if on_gpu:
        torch.cuda.synchronize(device)
    dist.barrier()
    start = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    if on_gpu:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None
    del engine, step
    gc.collect()
    return {"elapsed_s": elapsed, "peak_memory_gib": peak, "losses": losses}


def rank_main(rank: int, args: dict, runs: list[dict], out_dir: str) -> None:

    args = argparse.Namespace(**args)
    on_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    from pptk.training.engine import init_distributed

    init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    results = {}
    for spec in (RunSpec(**r) for r in runs):
        results[spec.name] = _measure(spec, args, device)
        if rank == 0:
            print(f"{spec.name}: {results[spec.name]['elapsed_s']:.2f}s for {args.steps} steps", flush=True)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def summarize(
    per_rank: list[dict],
    runs: list[RunSpec],
    args: argparse.Namespace,
    *,
    device: str,
    world: int,
    peak_tflops: float | None,
) -> dict:
    flops = model_flops_per_token(llama_config(args), args.seq_len)
    tokens_per_step = args.batch_per_gpu * world * args.seq_len
    out = []
    for spec in runs:
        elapsed = max(r[spec.name]["elapsed_s"] for r in per_rank)  # the slowest rank sets the pace
        tokens_per_s = tokens_per_step * args.steps / elapsed
        tflops = flops * tokens_per_s / 1e12
        peaks = [r[spec.name]["peak_memory_gib"] for r in per_rank]
        losses = per_rank[0][spec.name]["losses"]
        out.append(
            {
                **asdict(spec),
                "tokens_per_s": tokens_per_s,
                "tflops": tflops,
                "mfu": tflops / (peak_tflops * world) if peak_tflops else None,
                "peak_memory_gib": None if None in peaks else max(peaks),
                "peak_memory_gib_per_rank": peaks,
                "loss_first": losses[0],
                "loss_last": losses[-1],
                "finite": all(math.isfinite(v) for v in losses),
            }
        )
    baseline = next(r for r in out if r["kind"] == "hf")
    for r in out:
        r["ratio_to_hf_zero1"] = r["tokens_per_s"] / baseline["tokens_per_s"]
    import deepspeed
    import transformers

    return {
        "benchmark": "pptk pipeline vs Hugging Face + DeepSpeed ZeRO-1, same model, batch and bf16 config",
        "smoke": args.smoke,
        "device": device,
        "gpus": world if device != "cpu" else 0,
        "world_size": world,
        "peak_bf16_tflops_per_gpu": peak_tflops,
        "versions": {
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
        },
        "model": {
            k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "seq_len")
        }
        | {"model_flops_per_token": flops},
        "batch": {
            "global_batch": args.batch_per_gpu * world,
            "tokens_per_step": tokens_per_step,
            "steps": args.steps,
            "warmup_steps": args.warmup,
        },
        "activation_checkpointing": args.activation_checkpointing,
        "ds_config": "pipe_zero1_bf16.json",
        "runs": out,
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"
    if not on_gpu and not args.smoke:
        print(
            "gpu_bench: no CUDA device here (or DS_ACCELERATOR=cpu); run `make bench-gpu` on a GPU machine, or "
            "`--smoke` to check the script on CPU ranks",
            file=sys.stderr,
        )
        return 2
    world = torch.cuda.device_count() if on_gpu else 2
    device = torch.cuda.get_device_name(0) if on_gpu else platform.processor() or "cpu"
    peak = args.peak_tflops or (next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None) if on_gpu else None)
    runs = plan_runs(world, args)
    from pptk.launch.ranks import run_ranks

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pptk-gpu-bench-"))  # kept, with the ranks' logs, if a rank fails
    print(f"{device}: {world} rank(s); runs {[r.name for r in runs]}; rank logs in {work}", flush=True)
    run_ranks(
        rank_main,
        world_size=world,
        args=({**vars(args), "output": str(args.output)}, [asdict(r) for r in runs], str(work)),
        log_dir=work,
        timeout_s=3600,
    )
    per_rank = [torch.load(work / f"rank{r}.pt") for r in range(world)]
    shutil.rmtree(work)
    result = summarize(per_rank, runs, args, device=device, world=world, peak_tflops=peak)
    result["wall_s"] = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.output, result)
    for r in result["runs"]:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "n/a"
        print(
            f"{r['name']:>9}: {r['tokens_per_s']:,.0f} tokens/s, {r['tflops']:.1f} TFLOP/s, MFU {mfu}, peak {mem}, "
            f"x{r['ratio_to_hf_zero1']:.3f} of hf-zero1",
            flush=True,
        )
    print(f"written to {args.output} ({result['wall_s']:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
