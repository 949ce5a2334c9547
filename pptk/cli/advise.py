# `pptk plan --gpus N`: every pp x tp x dp layout of N GPUs forecast and ranked (pptk.parallel.advisor), as a table.
from __future__ import annotations

import argparse
import dataclasses
import json

from pptk.cli.lora_flags import lora_settings
from pptk.cli.plan import ADVISOR_NUMBERS, DEFAULT_TFLOPS, gib_text, vocab_layer_indices
from pptk.errors import PptkError
from pptk.parallel.advisor import GIB


def cmd_advise(args: argparse.Namespace) -> int:
    """Every pp x tp x dp layout of --gpus GPUs, forecast and ranked: pptk.parallel.advisor."""
    from pptk.parallel.activations import block_shape
    from pptk.parallel.advisor import Hardware, LoraCounts, Workload, advise, parse_memory
    from pptk.parallel.lora import lora_layout_problems
    from pptk.parallel.lora_plan import lora_parameters_per_layer
    from pptk.parallel.pipeline import max_positions, plan_pipeline
    from pptk.parallel.sequence_parallel import sequence_parallel_problem
    from pptk.parallel.tensor_parallel import check_tensor_parallel
    from pptk.parallel.vocab_parallel import vocab_parallel_problem
    from pptk.training.config import check_settings

    if args.pp is not None or args.tp != 1 or args.dp != 1:
        raise PptkError(
            "--gpus chooses pp, tp and dp itself: drop --pp, --tp and --dp (or drop --gpus to plan one layout)"
        )
    if args.selective_checkpointing:
        raise PptkError(
            "--gpus weighs no checkpointing, selective checkpointing and whole-block checkpointing itself: "
            "drop --selective-checkpointing (or drop --gpus and give --pp/--tp/--dp to forecast one layout)"
        )
    if args.schedule != "1f1b":
        raise PptkError(f"--gpus ranks 1f1b layouts only (got --schedule {args.schedule}); drop --schedule")
    check_settings(
        micro_batch_size=args.micro_batch_size,
        seq_len=args.seq_len,
        **{name: getattr(args, name) for name in ADVISOR_NUMBERS},
    )
    lora = lora_settings(args)
    plan = plan_pipeline(args.model, num_stages=1, task=args.task, seq_len=args.seq_len)
    positions = max_positions(plan.config) or 2048
    seq_len = min(args.seq_len or positions, positions)
    counts = None
    if lora is not None:
        per_layer = lora_parameters_per_layer(plan.layers, lora, task=plan.task)
        counts = LoraCounts(tuple(c.adapters for c in per_layer), tuple(c.trained_in_full for c in per_layer))
    vocab_split = not args.no_vocab_parallel and not vocab_parallel_problem(plan.config, plan.task, plan.layers, 2)
    if args.sequence_parallel and (
        problem := sequence_parallel_problem(plan.config.model_type, tp=2, vocab_split=vocab_split, task=plan.task)
    ):
        raise PptkError(f"--sequence-parallel: {problem}; drop --sequence-parallel")
    workload = Workload(
        shape=block_shape(plan.config),
        costs=plan.stages.costs,
        seq_len=seq_len,
        global_batch_size=args.global_batch_size or 16 * args.gpus,
        precision=args.precision,
        lora=counts,
        sequence_parallel=args.sequence_parallel,
        # at tp > 1 the vocabulary splits wherever the task can (checked at tp=2: the task and the head decide)
        vocab_layers=vocab_layer_indices(plan.layers) if vocab_split else frozenset(),
    )
    hardware = Hardware(
        gpus=args.gpus,
        memory_bytes=parse_memory(args.gpu_memory),
        tflops=args.gpu_tflops or DEFAULT_TFLOPS[args.precision],
        mfu=args.mfu,
        node_size=args.gpus_per_node,
    )

    def tp_problem(tp: int) -> str | None:
        if lora is not None and (lora_problems := lora_layout_problems(tp=tp)):
            return lora_problems[0]
        try:
            check_tensor_parallel(plan.config, tp)
        except PptkError as error:
            return str(error)
        return None

    sizes = (args.micro_batch_size,) if args.micro_batch_size is not None else (1, 2, 4, 8)
    results = advise(
        workload, hardware, micro_batch_sizes=sizes, tp_problem=tp_problem, selective=_has_attention_module(plan)
    )
    fits = [f for f in results if f.problem is None]
    rejected = {}  # per pp x tp x dp grid with no variant that fits: the variant closest to fitting
    fitting_grids = {(f.candidate.pp, f.candidate.tp) for f in fits}
    for f in results:
        grid = (f.candidate.pp, f.candidate.tp)
        if f.problem is not None and grid not in fitting_grids and grid not in rejected:
            rejected[grid] = f
    usable = hardware.memory_bytes * hardware.usable
    assumptions = {
        "measured_on_cpu": "bytes per parameter (DeepSpeed 0.19.8 ZeRO-1, benchmarks/plan_memory.py) and the "
        "activations each block saves (Hugging Face modules, tests/unit/test_activations.py)",
        "modelled": f"step time: {hardware.tflops:g} TFLOP/s per GPU x MFU {hardware.mfu:g} on the FLOP cost "
        "model, the 1F1B bubble (pp-1)/(m+pp-1); communication and the optimizer step not counted; "
        f"{hardware.usable:.0%} of GPU memory usable",
    }
    if args.json:
        print(
            json.dumps(
                {
                    "model": plan.source.label,
                    "gpus": hardware.gpus,
                    "gpu_memory_gib": hardware.memory_bytes / GIB,
                    "usable_gib": usable / GIB,
                    "precision": args.precision,
                    "seq_len": seq_len,
                    "global_batch_size": workload.global_batch_size,
                    "lora": None if lora is None else dataclasses.asdict(lora),
                    "assumptions": assumptions,
                    "fits": [_forecast_row(f, workload) for f in fits],
                    "rejected": [_forecast_row(f, workload) for f in results if f.problem is not None],
                },
                indent=2,
            )
        )
        return 0
    blocks = sum(c.role == "block" for c in plan.stages.costs)
    print(
        f"{plan.source.label}: {plan.config.model_type}, {plan.task}, {blocks} blocks; {hardware.gpus} GPUs x "
        f"{gib_text(hardware.memory_bytes / GIB)} ({usable / GIB:.1f} GiB usable), {args.precision}, "
        f"sequence {seq_len}, global batch {workload.global_batch_size} sequences"
        + (f", LoRA r={lora.r}" if lora is not None else "")
    )
    print(f"measured (CPU): {assumptions['measured_on_cpu']}")
    print(f"modelled (GPU): {assumptions['modelled']}")
    if fits:
        print(
            f"layouts that fit, fastest first ({min(args.top, len(fits))} of {len(fits)}; ckpt: off, attn = each "
            "block's attention recomputed, all = every block recomputed):"
        )
        print(
            f"  {'#':>2}  {'pp':>3}  {'tp':>3}  {'dp':>3}  {'micro-batch':>11}  {'m':>4}  {'ckpt':>4}  {'ZeRO':>4}  "
            f"{'step s':>7}  {'bubble':>6}  {'tokens/s':>9}  memory per rank (peak)"
        )
        for n, f in enumerate(fits[: args.top], 1):
            c = f.candidate
            tokens = workload.global_batch_size * seq_len / f.step_seconds
            print(
                f"  {n:>2}  {c.pp:>3}  {c.tp:>3}  {c.dp:>3}  {c.micro_batch_size:>11}  {f.micro_batches:>4}  "
                f"{checkpointing_label(c):>4}  {c.zero_stage:>4}  {f.step_seconds:>7.2f}  "
                f"{f.bubble:>6.1%}  {tokens:>9,.0f}  {f.peak_bytes / GIB:.1f} GiB (stage {f.peak_rank})"
            )
    else:
        print("no layout fits: more GPUs, --lora-r, a shorter --seq-len, or a larger --gpu-memory")
    if rejected:
        print("layouts that do not fit or cannot run, closest to fitting first (the closest variant of each grid):")
        for f in sorted(rejected.values(), key=lambda f: (not f.rank_bytes, f.peak_bytes)):
            c = f.candidate
            detail = (
                f" (micro-batch {c.micro_batch_size}, checkpointing {checkpointing_label(c)}: "
                f"{f.peak_bytes / GIB:.1f} GiB)"
                if f.rank_bytes
                else ""
            )
            print(f"  pp={c.pp} tp={c.tp} dp={c.dp}: {f.problem}{detail}")
    return 0


def checkpointing_label(candidate) -> str:
    """off | attn (selective: each block's attention recomputed) | all (every block recomputed)."""
    return "all" if candidate.checkpoint_interval else "attn" if candidate.selective else "off"


def _has_attention_module(plan) -> bool:
    from pptk.parallel.recompute import attention_modules, first_block_on_meta

    return bool(attention_modules(first_block_on_meta(plan.layers)))


def _forecast_row(f, workload) -> dict:
    row = {**dataclasses.asdict(f.candidate), "micro_batches": f.micro_batches, "problem": f.problem}
    if f.rank_bytes:
        row |= {
            "step_seconds": f.step_seconds,
            "bubble": f.bubble,
            "tokens_per_second": workload.global_batch_size * workload.seq_len / f.step_seconds,
            "rank_gib": [b / GIB for b in f.rank_bytes],
            "train_state_gib": [b / GIB for b in f.rank_train_state],
            "peak_gib": f.peak_bytes / GIB,
            "peak_stage": f.peak_rank,
        }
    return row
