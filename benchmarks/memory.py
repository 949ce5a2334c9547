"""Peak resident memory of each rank while loading its stage, and of each converter, against the weights it holds.

For every measured process: extra peak RSS = peak RSS (VmHWM) - RSS before the work (after imports), divided
by the bytes of the weights that process must hold (its stage, or its tp slice of it, for a rank; the largest
layer for hf-to-ds, which converts layer by layer; one shard for ds-to-hf). Target: at most 1.3x.
Writes benchmarks/results/memory.json.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/memory.py              # ~540 MB GPT-2, pp=2, CPU
    python benchmarks/memory.py --pp 2 --tp 2 --output benchmarks/results/memory_tp2.json  # 4 ranks, each a slice
    python benchmarks/memory.py --hidden 2048 --layers 16 --pp 4                 # bigger, on a larger machine
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from results_file import write_result

RESULTS = Path(__file__).resolve().parent / "results"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    # VmHWM: this address space's high-water mark. (getrusage's ru_maxrss survives fork+exec, so a child would
    # report its parent's peak.)
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _load_stage(rank: int, model_dir: str, pp: int, tp: int, out: str) -> None:
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from pptk.parallel.pipeline import build_pipeline_module, plan_pipeline, resolve_model
    from pptk.training.engine import init_distributed

    init_distributed()
    plan = plan_pipeline(resolve_model(model_dir), num_stages=pp, tp=tp)
    topology = PipeModelDataParallelTopology(pp, tp, 1) if tp > 1 else None
    before = rss_bytes()
    module = build_pipeline_module(plan, topology=topology)
    held = sum(p.numel() * p.element_size() for p in module.parameters())
    grid = module.mpu()
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "what": f"rank {rank}: build + load stage {grid.get_stage_id()}"
                + (f", tp slice {grid.get_slice_parallel_rank()}" if tp > 1 else ""),
                "rss_before": before,
                "peak": peak_rss_bytes(),
                "weights_bytes": held,
            }
        )
    )


def _convert(direction: str, src: str, dst: str, max_shard_size: str) -> dict:
    from pptk.checkpoints.convert import ds_to_hf, hf_to_ds
    from pptk.models import supported_model_types

    supported_model_types()  # import every family module (and its transformers modules) before the baseline
    before = rss_bytes()
    if direction == "hf-to-ds":
        tag = hf_to_ds(src, dst, pp=2)
        peak = peak_rss_bytes()  # before sizing the layers below, which reads them
        held = max(
            sum(t.numel() * t.element_size() for t in torch.load(p, weights_only=True, mmap=True).values())
            for p in tag.glob("layer_*-model_states.pt")
        )
        what = "hf-to-ds (one layer at a time)"
    else:
        out = ds_to_hf(src, dst, max_shard_size=max_shard_size)
        peak = peak_rss_bytes()
        held = max(p.stat().st_size for p in out.glob("*.safetensors"))
        what = "ds-to-hf (one shard at a time)"
    return {"what": what, "rss_before": before, "peak": peak, "weights_bytes": held}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The GPT-2 the memory benchmarks measure (see gpt2_config)."""
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)


def gpt2_config(args: argparse.Namespace):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=args.vocab,
        n_positions=1024,
        n_embd=args.hidden,
        n_layer=args.layers,
        n_head=args.hidden // 64,
        bos_token_id=0,
        eos_token_id=0,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--tp", type=int, default=1, help="also shard each stage over tp ranks (each reads its slices)")
    p.add_argument("--max-shard-size", default="200MB")
    p.add_argument("--output", type=Path, default=RESULTS / "memory.json")
    p.add_argument("--convert", nargs=3, metavar=("DIRECTION", "SRC", "DST"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.convert:  # a fresh process per converter, so its peak is its own
        print(json.dumps(_convert(*args.convert, args.max_shard_size)))
        return

    from transformers import GPT2LMHeadModel

    from pptk.launch.ranks import run_ranks

    work = Path(tempfile.mkdtemp(prefix="pptk-memory-"))
    model = GPT2LMHeadModel(gpt2_config(args))
    model.save_pretrained(work / "hf")
    num_params = model.num_parameters()
    del model
    rows = []
    for direction, src, dst in (("hf-to-ds", work / "hf", work / "ds"), ("ds-to-hf", work / "ds", work / "out")):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--convert",
                direction,
                str(src),
                str(dst),
                "--max-shard-size",
                args.max_shard_size,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    world = args.pp * args.tp
    run_ranks(
        _load_stage, world_size=world, args=(str(work / "hf"), args.pp, args.tp, str(work)), log_dir=work / "logs"
    )
    rows += [json.loads((work / f"rank{r}.json").read_text()) for r in range(world)]

    for row in rows:
        row["extra_peak_bytes"] = row["peak"] - row["rss_before"]
        row["ratio"] = row["extra_peak_bytes"] / row["weights_bytes"]
    worst = max(row["ratio"] for row in rows)
    result = {
        "benchmark": "peak RSS over the weights each process holds",
        "target_ratio": 1.3,
        "within_target": worst <= 1.3,
        "worst_ratio": worst,
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
            "pp": args.pp,
            "tp": args.tp,
            "params": num_params,
        },
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.output, result)
    for row in rows:
        print(
            f"{row['what']:<42} holds {row['weights_bytes'] / 2**20:8.1f} MiB, extra peak "
            f"{row['extra_peak_bytes'] / 2**20:8.1f} MiB: ratio {row['ratio']:.2f}"
        )
    print(f"worst ratio {worst:.2f} ({'within' if worst <= 1.3 else 'over'} the 1.3 target) -> {args.output}")


if __name__ == "__main__":
    main()
