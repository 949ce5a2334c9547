"""Peak memory per rank at pp=2 x tp=2: the vocabulary split vs whole, and sequence parallelism vs not.

A LLaMA-shaped model whose vocabulary (65,536 rows, untied) dwarfs its blocks, as a 128k-vocabulary model's does
at scale: the first stage holds the embedding, the last the LM head and the logits. For fp32 and bf16, 4 gloo
ranks build the recipes' engine (``build_engine``, the shipped DeepSpeed config of the precision) once with the
vocabulary split over the tp ranks (the default at tp > 1) and once with ``vocab_parallel=False``, and train a few
steps. Measured as benchmarks/plan_memory.py measures: peak RSS (VmHWM, reset just before the build) minus the RSS
before it and the host memory that is not a tensor, with glibc's mmap threshold pinned. Recorded beside it: `pptk
plan --json`'s forecast of the same layout, with and without ``--no-vocab-parallel``. Writes
benchmarks/results/vocab_memory.json with the split / whole ratio per stage.

Then the activations: a LLaMA with long sequences and a small vocabulary (hidden 512, 4 layers, 2 x 1024 tokens,
8192 words), both runs with the vocabulary split, without and with ``sequence_parallel`` (norms, residuals and the
activations sent between the stages on S/tp positions), forecast by `pptk plan [--sequence-parallel]`.

    make install && DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vocab_memory.py
    ... --vocab 131072 --hidden 512          # a 128k vocabulary (needs ~4x the memory)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from memory import peak_rss_bytes, rss_bytes
from plan_memory import launch_and_read, live_tensor_bytes, pin_glibc_mmap_threshold, plan_json, reset_peak_rss
from results_file import write_result

RESULTS = Path(__file__).resolve().parent / "results"
MICRO_BATCHES = 4


def _train_rank(rank: int, model_dir: str, run: dict, out: str) -> None:
    import torch

    from pptk.parallel.layout import Layout
    from pptk.parallel.pipeline import plan_pipeline, resolve_model
    from pptk.training.ds_config import fill_ds_config, load_ds_config, shipped_config
    from pptk.training.engine import build_engine, init_distributed

    init_distributed()
    layout = Layout(pp=2, tp=2, dp=1, micro_batch_size=run["micro_batch_size"], grad_accum_steps=MICRO_BATCHES)
    config = fill_ds_config(
        load_ds_config(shipped_config(run["precision"])),
        layout=layout,
        lr=1e-4,
        weight_decay=0.01,
        warmup_steps=1,
        total_steps=run["steps"] + 1,
        grad_clip=1.0,
    )
    plan = plan_pipeline(
        resolve_model(model_dir),
        num_stages=2,
        tp=2,
        seq_len=run["seq_len"],
        vocab_parallel=run["vocab_parallel"],
        sequence_parallel=run.get("sequence_parallel", False),
    )
    reset_peak_rss()
    before = rss_bytes()
    engine = build_engine(plan, layout=layout, ds_config=config, seed=0, loss_fn=plan.loss_fn())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, plan.config.vocab_size, (run["micro_batch_size"], run["seq_len"]), generator=gen)
    batches = iter([((ids, torch.ones_like(ids)), ids)] * (MICRO_BATCHES * run["steps"]))
    for _ in range(run["steps"]):
        loss = engine.train_batch(batches)
    held = sum(p.numel() for p in engine.module.parameters())
    peak = peak_rss_bytes() - before
    host = rss_bytes() - before - live_tensor_bytes()  # not a tensor: what a GPU would not hold
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "stage": engine.stage_id,
                "tp_rank": engine.grid.get_slice_parallel_rank(),
                "measured": peak - host,
                "host": host,
                "params_held": held,
                "loss": float(loss),
            }
        )
    )


def forecast(model_dir: Path, run: dict) -> list[float]:
    """Bytes per pipeline rank (one tp rank of each stage) from `pptk plan --json`."""
    flags = [
        "--pp=2",
        "--tp=2",
        f"--precision={run['precision']}",
        f"--seq-len={run['seq_len']}",
        f"--micro-batch-size={run['micro_batch_size']}",
        f"--grad-accum-steps={MICRO_BATCHES}",
        *([] if run["vocab_parallel"] else ["--no-vocab-parallel"]),
        *(["--sequence-parallel"] if run.get("sequence_parallel") else []),
    ]
    return [row["total_gib"] * 2**30 for row in plan_json(model_dir, flags)["ranks"]]


def measure(model_dir: Path, run: dict, out: Path) -> list[dict]:
    """One run on the 4 ranks: each rank's measurement with its stage's forecast."""
    return launch_and_read(
        _train_rank, world_size=4, model_dir=model_dir, run=run, out=out, planned=forecast(model_dir, run)
    )


def llama_config(args: argparse.Namespace, *, vocab: int | None = None, hidden: int | None = None, seq_len=None):
    from transformers import LlamaConfig

    hidden = hidden or args.hidden
    return LlamaConfig(
        vocab_size=vocab or args.vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq_len or args.seq_len,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--output", type=Path, default=RESULTS / "vocab_memory.json")
    args = p.parse_args()
    pin_glibc_mmap_threshold()

    work = Path(tempfile.mkdtemp(prefix="pptk-vocab-memory-"))
    llama_config(args).save_pretrained(work / "model")  # a config only: random init, as `pptk plan` reads it
    measured: dict[tuple[str, str], list[dict]] = {}
    for precision in ("fp32", "bf16"):
        for kind, split in (("whole", False), ("split", True)):
            run = {
                "precision": precision,
                "vocab_parallel": split,
                "steps": args.steps,
                "seq_len": args.seq_len,
                "micro_batch_size": args.micro_batch_size,
            }
            measured[(precision, kind)] = measure(work / "model", run, work / f"{precision}-{kind}")
    rows = []
    for precision in ("fp32", "bf16"):
        for whole, split in zip(measured[(precision, "whole")], measured[(precision, "split")]):
            row = {
                "precision": precision,
                "stage": whole["stage"],
                "tp_rank": whole["tp_rank"],
                "whole_measured_bytes": whole["measured"],
                "split_measured_bytes": split["measured"],
                "split_over_whole_measured": split["measured"] / whole["measured"],
                "whole_forecast_bytes": whole["forecast"],
                "split_forecast_bytes": split["forecast"],
                "split_over_whole_forecast": split["forecast"] / whole["forecast"],
                "split_forecast_over_measured": split["forecast"] / split["measured"],
                "whole_params_held": whole["params_held"],
                "split_params_held": split["params_held"],
                "same_loss": whole["loss"] == split["loss"] or abs(whole["loss"] - split["loss"]) < 1e-2,
            }
            rows.append(row)
            print(
                f"{precision} stage {row['stage']} tp rank {row['tp_rank']}: whole {whole['measured'] / 2**20:7.1f} "
                f"MiB, split {split['measured'] / 2**20:7.1f} MiB: x{row['split_over_whole_measured']:.2f} measured, "
                f"x{row['split_over_whole_forecast']:.2f} forecast by `pptk plan`"
            )
    activations = measure_sequence_parallel(args, work)
    last = [r for r in rows if r["stage"] == 1]
    result = {
        "benchmark": "peak memory per rank at pp=2 x tp=2: vocabulary split over the tp ranks vs whole (CPU ranks)",
        "model": {
            "family": "llama",
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
            "tied": False,
            "seq_len": args.seq_len,
            "micro_batch": args.micro_batch_size,
            "micro_batches": MICRO_BATCHES,
        },
        "measured": "peak RSS (VmHWM, reset before the engine is built) minus the RSS before it and the host "
        "memory that is not a tensor (RSS minus the live tensors at the end), per rank, after "
        f"{args.steps} steps with the shipped DeepSpeed config of the precision, glibc's mmap threshold pinned "
        "(benchmarks/plan_memory.py)",
        "forecast": "`pptk plan --json` total per rank (weights, gradients, optimizer state, activations)",
        "rows": rows,
        "last_stage_split_over_whole_measured": {
            precision: max(r["split_over_whole_measured"] for r in last if r["precision"] == precision)
            for precision in ("fp32", "bf16")
        },
        "last_stage_split_over_whole_forecast": {
            precision: max(r["split_over_whole_forecast"] for r in last if r["precision"] == precision)
            for precision in ("fp32", "bf16")
        },
        "sequence_parallel": activations,
    }
    write_result(args.output, result)


def measure_sequence_parallel(args: argparse.Namespace, work: Path) -> dict:
    """Both with the vocabulary split: sequence parallelism off, then on; a long-sequence, small-vocabulary LLaMA."""

    shape = {"hidden": 512, "vocab": 8192, "seq_len": 1024, "micro_batch": 2, "layers": args.layers}
    llama_config(args, vocab=shape["vocab"], hidden=shape["hidden"], seq_len=shape["seq_len"]).save_pretrained(
        work / "long"
    )
    runs = {}
    for precision in ("fp32", "bf16"):
        for kind, sequence in (("off", False), ("on", True)):
            run = {
                "precision": precision,
                "vocab_parallel": True,
                "sequence_parallel": sequence,
                "steps": args.steps,
                "seq_len": shape["seq_len"],
                "micro_batch_size": shape["micro_batch"],
            }
            runs[(precision, kind)] = measure(work / "long", run, work / f"sp-{precision}-{kind}")
    rows = []
    for precision in ("fp32", "bf16"):
        for off, on in zip(runs[(precision, "off")], runs[(precision, "on")]):
            row = {
                "precision": precision,
                "stage": off["stage"],
                "tp_rank": off["tp_rank"],
                "off_measured_bytes": off["measured"],
                "on_measured_bytes": on["measured"],
                "on_over_off_measured": on["measured"] / off["measured"],
                "saved_measured_bytes": off["measured"] - on["measured"],
                "saved_forecast_bytes": off["forecast"] - on["forecast"],
                "on_forecast_over_measured": on["forecast"] / on["measured"],
                "same_loss": abs(off["loss"] - on["loss"]) < 1e-2,
            }
            rows.append(row)
            print(
                f"sequence parallel, {precision} stage {row['stage']} tp rank {row['tp_rank']}: "
                f"{off['measured'] / 2**20:7.1f} -> {on['measured'] / 2**20:7.1f} MiB "
                f"(saved {row['saved_measured_bytes'] / 2**20:.1f}, forecast {row['saved_forecast_bytes'] / 2**20:.1f})"
            )
    return {"model": {"family": "llama", **shape, "micro_batches": MICRO_BATCHES}, "rows": rows}


if __name__ == "__main__":
    main()
