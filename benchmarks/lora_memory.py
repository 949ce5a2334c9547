"""Peak memory per rank of LoRA against full fine-tuning: the same GPT-2, pp=2, fp32 and bf16, on CPU ranks.

For each precision, 2 gloo ranks build the recipes' engine (``build_engine``, the shipped DeepSpeed config of the
precision) once for full fine-tuning and once with LoRA (``--lora-r``, all-linear), and train a few steps with
dropout on. Measured as in benchmarks/plan_memory.py: peak RSS (VmHWM, reset just before the build) minus the RSS
before the build (peft and accelerate imported before it, on both sides) and the host memory that is not a tensor,
with glibc's mmap threshold pinned. Recorded beside it: `pptk plan --json`'s
forecast for the same layout, with and without LoRA. Writes benchmarks/results/lora_memory.json, with the LoRA /
full ratio per rank and precision.

    make install && DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_memory.py
    ... --lora-r 16 --hidden 1024 --layers 8      # the defaults below are smaller, for a laptop
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from memory import add_model_args, gpt2_config, peak_rss_bytes, rss_bytes
from plan_memory import launch_and_read, live_tensor_bytes, pin_glibc_mmap_threshold, plan_json, reset_peak_rss
from results_file import write_result

RESULTS = Path(__file__).resolve().parent / "results"


def _train_rank(rank: int, model_dir: str, run: dict, out: str) -> None:
    import torch

    from pptk.parallel.layout import Layout
    from pptk.parallel.lora import LoraSettings
    from pptk.parallel.pipeline import plan_pipeline, resolve_model
    from pptk.training.ds_config import fill_ds_config, load_ds_config, shipped_config
    from pptk.training.engine import build_engine, init_distributed

    init_distributed()
    layout = Layout(pp=2, dp=1, micro_batch_size=run["micro_batch_size"], grad_accum_steps=4)
    config = fill_ds_config(
        load_ds_config(shipped_config(run["precision"])),
        layout=layout,
        lr=1e-4,
        weight_decay=0.01,
        warmup_steps=1,
        total_steps=run["steps"] + 1,
        grad_clip=1.0,
    )
    plan = plan_pipeline(resolve_model(model_dir), num_stages=2, seq_len=run["seq_len"])
    lora = LoraSettings(r=run["lora_r"]) if run["lora_r"] else None
    import accelerate  # noqa: F401  (apply_lora imports these lazily: the baseline must hold them already)
    import peft.tuners.lora  # noqa: F401

    reset_peak_rss()
    before = rss_bytes()
    engine = build_engine(plan, layout=layout, ds_config=config, seed=0, loss_fn=plan.loss_fn(), lora=lora)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, plan.config.vocab_size, (run["micro_batch_size"], run["seq_len"]), generator=gen)
    batches = iter([((ids, torch.ones_like(ids)), ids)] * (layout.grad_accum_steps * run["steps"]))
    for _ in range(run["steps"]):
        engine.train_batch(batches)
    trained = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    peak = peak_rss_bytes() - before
    host = rss_bytes() - before - live_tensor_bytes()  # not a tensor: what a GPU would not hold
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"stage": engine.stage_id, "measured": peak - host, "host": host, "trained_params": trained})
    )


def forecast(model_dir: Path, run: dict) -> list[float]:
    """Bytes per pipeline rank from `pptk plan --json` (with --lora-r when the run uses LoRA)."""
    flags = [
        "--pp=2",
        f"--precision={run['precision']}",
        f"--seq-len={run['seq_len']}",
        f"--micro-batch-size={run['micro_batch_size']}",
        "--grad-accum-steps=4",
        *([f"--lora-r={run['lora_r']}"] if run["lora_r"] else []),
    ]
    return [row["total_gib"] * 2**30 for row in plan_json(model_dir, flags)["ranks"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.set_defaults(hidden=512, layers=8)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--output", type=Path, default=RESULTS / "lora_memory.json")
    args = p.parse_args()
    pin_glibc_mmap_threshold()

    work = Path(tempfile.mkdtemp(prefix="pptk-lora-memory-"))
    gpt2_config(args).save_pretrained(work / "model")  # a config only: random init, as `pptk plan` reads it
    measured: dict[tuple[str, str], list[dict]] = {}
    for precision in ("fp32", "bf16"):
        for kind, lora_r in (("full", 0), ("lora", args.lora_r)):
            run = {
                "precision": precision,
                "lora_r": lora_r,
                "steps": args.steps,
                "seq_len": args.seq_len,
                "micro_batch_size": args.micro_batch_size,
            }
            measured[(precision, kind)] = launch_and_read(
                _train_rank,
                world_size=2,
                model_dir=work / "model",
                run=run,
                out=work / f"{precision}-{kind}",
                planned=forecast(work / "model", run),
            )
    rows = []
    for precision in ("fp32", "bf16"):
        for full, lora in zip(measured[(precision, "full")], measured[(precision, "lora")]):
            row = {
                "precision": precision,
                "stage": full["stage"],
                "full_measured_bytes": full["measured"],
                "lora_measured_bytes": lora["measured"],
                "lora_over_full_measured": lora["measured"] / full["measured"],
                "host_bytes": [full["host"], lora["host"]],
                "full_forecast_bytes": full["forecast"],
                "lora_forecast_bytes": lora["forecast"],
                "lora_over_full_forecast": lora["forecast"] / full["forecast"],
                "full_trained_params": full["trained_params"],
                "lora_trained_params": lora["trained_params"],
            }
            rows.append(row)
            print(
                f"{precision} stage {row['stage']}: full {full['measured'] / 2**20:7.1f} MiB, LoRA "
                f"{lora['measured'] / 2**20:7.1f} MiB: x{row['lora_over_full_measured']:.2f} measured, "
                f"x{row['lora_over_full_forecast']:.2f} forecast by `pptk plan --lora-r {args.lora_r}`"
            )
    result = {
        "benchmark": "peak memory per rank: LoRA vs full fine-tuning, the same model, pp=2 (CPU ranks)",
        "model": {
            "family": "gpt2",
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
            "seq_len": args.seq_len,
            "micro_batch": args.micro_batch_size,
            "micro_batches": 4,
            "lora": {"r": args.lora_r, "target_modules": "all-linear"},
        },
        "measured": "peak RSS (VmHWM, reset before the engine is built) minus the RSS before it and the host "
        "memory that is not a tensor (RSS minus the live tensors at the end: host_bytes), per rank, after "
        f"{args.steps} steps with the shipped DeepSpeed config of the precision, glibc's mmap threshold pinned "
        "(benchmarks/plan_memory.py)",
        "forecast": "`pptk plan --json` total per rank (weights, gradients, optimizer state, activations)",
        "rows": rows,
        "lora_over_full_measured": {
            precision: max(r["lora_over_full_measured"] for r in rows if r["precision"] == precision)
            for precision in ("fp32", "bf16")
        },
        "lora_over_full_forecast": {
            precision: max(r["lora_over_full_forecast"] for r in rows if r["precision"] == precision)
            for precision in ("fp32", "bf16")
        },
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
