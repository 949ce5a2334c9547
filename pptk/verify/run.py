# `pptk verify`: one training step through the real pipeline engine on CPU ranks, compared with Hugging Face.
"""The check a user runs before spending GPU hours: does this model convert exactly?

The parent process builds the Hugging Face model (random or pretrained), saves it, and runs the reference step:
forward and backward of every micro-batch, loss scaled as DeepSpeed scales it, one SGD step with lr=1 (so a
parameter's change *is* its gradient and any gradient error shows up undiluted). Then ``pp * dp`` gloo ranks build
the pipeline from the saved directory (each reading only its own tensors), run ``train_batch`` once with ZeRO, and
write their parameters back by Hugging Face name. Dropout is off.

``precision="fp32"`` compares parameters after the step to 1e-5. ``precision="bf16"`` runs the engine with the
shipped bf16 config (DeepSpeed's BF16_Optimizer: bf16 weights and activations, fp32 gradient accumulation and fp32
master weights; bf16 gradient accumulation with ZeRO-0) against the Hugging Face model loaded in bf16 (the same
weights cast to bf16), whose gradients are accumulated the same way. The ranks report their fp32 master weights,
so the step's update is the gradient itself; pptk.verify.compare says how gradients are compared in bf16.

With ``lora`` (LoraSettings), both sides train LoRA adapters on frozen weights: peft's on the Hugging Face model,
pptk's ``apply_lora`` on the stages, the same non-zero adapters on both (pptk.verify.lora). The trained tensors are
compared as above; every frozen weight must come out of the step exactly as Hugging Face holds it. tp=1 only.

``verify_many`` = ``prepare_jobs`` (the parent's half: plans, saved models and batches, reference steps) +
``launch_jobs`` (one launch of the ranks, then the comparison).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from pptk.errors import PptkError
from pptk.launch.ranks import run_ranks
from pptk.models import first_tied_index
from pptk.models.heads import config_for_task, infer_task
from pptk.parallel.lora import LoraSettings, lora_layout_problems, resolve_lora_targets
from pptk.parallel.pipeline import PipelinePlan, max_positions, pipeline_inputs, plan_pipeline, resolve_model
from pptk.training.config import check_settings
from pptk.verify.compare import BF16_TOLERANCE, FP32_TOLERANCE, VerifyResult, compare
from pptk.verify.ds_settings import grad_accum_dtype, verify_ds_config
from pptk.verify.lora import add_stage_adapters, settings_for_check, stage_names
from pptk.verify.reference import LEARNING_RATE, micro_batches, reference_step

VERIFY_PRECISIONS = ("fp32", "bf16")
__all__ = ["PreparedJob", "VerifyJob", "VerifyResult", "launch_jobs", "prepare_jobs", "verify", "verify_many"]


@dataclass(frozen=True)
class VerifyJob:
    """One model/task to check; several jobs share one launch of the ranks (start-up dominates on CPU)."""

    model: str | Path
    task: str | None = None  # None: read from config.architectures (pptk.models.heads.infer_task)
    micro_batch_size: int = 2
    micro_batches: int = 2
    seq_len: int = 32
    partition_method: str = "compute"
    attn_implementation: str = "sdpa"
    seed: int = 0
    # save the reference in shards of this size (e.g. "100KB") so the ranks load their stages from a sharded index
    max_shard_size: str | None = None
    precision: str = "fp32"  # or "bf16"; jobs of both precisions can share a launch
    schedule: str = "1f1b"  # or "dualpipev" (needs micro_batches >= 2 * pp); jobs of both can share a launch
    allow_missing: bool = False  # PASS although the checkpoint lacks (or has extra) tensors both sides initialise
    lora: LoraSettings | None = None  # LoRA against peft on the same adapters (pptk.verify.lora); tp=1 only
    vocab_parallel: bool | None = None  # at tp > 1 (pptk.parallel.vocab_parallel); None: wherever the task can
    sequence_parallel: bool = False  # at tp > 1 (pptk.parallel.sequence_parallel)
    selective_checkpointing: bool = False  # each block's attention recomputed (pptk.parallel.recompute)


@dataclass(frozen=True)
class PreparedJob:
    """A job after the parent's half: its plan, the reference step's results, and the folder the ranks read.

    The ranks read ``work/hf`` (the model) and ``work/batch.pt`` (the micro-batches) only when launched, so what
    they load can be inspected, or deliberately broken to show that the check catches it, in between.
    """

    job: VerifyJob
    plan: PipelinePlan
    reference: dict
    work: Path


def _verify_rank(rank: int, workdir: str, jobs: list[dict], layout: dict) -> None:
    from pptk.training.engine import init_distributed

    init_distributed()  # pptk verify runs on CPU ranks (gloo)
    for index, job in enumerate(jobs):
        _verify_one(rank, Path(workdir) / f"job{index}", job, layout)


def _verify_one(rank: int, work: Path, job: dict, layout: dict) -> None:
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from pptk.deepspeed_compat import (
        allow_frozen_tied_weights,
        get_param_state,
        separate_receive_buffers,
        tensor_parallel_group,
    )
    from pptk.parallel.hf_weights import hf_names
    from pptk.parallel.pipeline import build_pipeline_module
    from pptk.parallel.tensor_parallel import gather_full, shard_spec

    tp = layout["tp"]
    lora = LoraSettings(**job["lora"]) if job["lora"] else None

    plan = plan_pipeline(
        resolve_model(work / "hf"),
        num_stages=layout["pp"],
        task=job["task"],
        partition_method=job["partition_method"],
        attn_implementation=job["attn_implementation"],
        dropout=False,
        seq_len=job["seq_len"],
        schedule=job["schedule"],
        measured_ms=job["measured_ms"],
        tp=tp,
        vocab_parallel=job["vocab_parallel"],
        sequence_parallel=job["sequence_parallel"],
        recompute_attention=job["selective_checkpointing"],
    )
    topology = PipeModelDataParallelTopology(layout["pp"], tp, layout["dp"]) if tp > 1 else None
    module = build_pipeline_module(plan, topology=topology)
    if lora is not None:
        add_stage_adapters(module, plan, lora, work=work, seed=job["seed"])
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=LEARNING_RATE)
    engine, *_ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        config=verify_ds_config(
            micro_batch_size=job["micro_batch_size"],
            micro_batches=job["micro_batches"],
            dp=layout["dp"],
            zero_stage=layout["zero_stage"],
            precision=job["precision"],
            tp=tp,
        ),
    )
    allow_frozen_tied_weights(engine)
    separate_receive_buffers(engine)
    batch = torch.load(work / "batch.pt")
    micro = list(micro_batches(batch["inputs"], batch["labels"], pipeline_inputs(plan), job["micro_batch_size"]))
    dp_rank = engine.grid.get_data_parallel_rank()
    per_replica = job["micro_batches"]
    loss = engine.train_batch(iter(micro[dp_rank * per_replica : (dp_rank + 1) * per_replica]))
    names: dict[str, str | None] = (
        dict(hf_names(engine.module, plan.layers)) if lora is None else stage_names(engine.module, plan)
    )
    # The fp32 master weights: in bf16 the module's own weights are only their rounded copies.
    params = {
        name: get_param_state(engine.optimizer, p, "fp32")
        for k, p in engine.module.named_parameters()
        if (name := names[k]) is not None
    }
    if tp > 1:  # each tp rank holds slices: gather them back into Hugging Face's shapes before comparing
        group = tensor_parallel_group(engine.module)[0]
        specs = {names[k]: shard_spec(p) for k, p in engine.module.named_parameters()}
        params = {name: gather_full(value, specs[name], group=group) for name, value in params.items()}
    torch.save(
        {
            "loss": float(loss),
            "stage": engine.stage_id,
            "dp_rank": dp_rank,
            "tp_rank": tensor_parallel_group(engine.module)[1],
            "local_numel": sum(p.numel() for p in engine.module.parameters()),  # what this rank holds (a slice)
            "params": params,
            "owned": _owned_names(engine.module, plan, names),
        },
        work / f"result{rank}.pt",
    )


def _owned_names(module, plan, names: dict[str, str | None]) -> list[str]:
    """HF names this stage counts as its own: a tied module counts on the first stage that holds it."""
    first_stage = {key: plan.stages.rank_of(index) for key, index in first_tied_index(plan.layers).items()}
    owned = []
    for key in dict(module.named_parameters()):
        if key.startswith("tied_modules."):
            tied_key = key.split(".")[1]
            if first_stage[tied_key] != module.stage_id:
                continue
        if (name := names[key]) is not None:
            owned.append(name)
    return owned


def verify(
    model: str | Path,
    *,
    pp: int,
    dp: int = 1,
    tp: int = 1,
    task: str | None = None,
    micro_batch_size: int = 2,
    micro_batches: int = 2,
    seq_len: int = 32,
    zero_stage: int = 1,
    partition_method: str = "compute",
    attn_implementation: str = "sdpa",
    precision: str = "fp32",
    schedule: str = "1f1b",
    tolerance: float | None = None,
    seed: int = 0,
    workdir: str | Path | None = None,
    top: int = 5,
    allow_missing: bool = False,
    lora: LoraSettings | None = None,
    vocab_parallel: bool | None = None,
    sequence_parallel: bool = False,
    selective_checkpointing: bool = False,
) -> VerifyResult:
    job = VerifyJob(
        model,
        task=task,
        micro_batch_size=micro_batch_size,
        micro_batches=micro_batches,
        seq_len=seq_len,
        partition_method=partition_method,
        attn_implementation=attn_implementation,
        seed=seed,
        precision=precision,
        schedule=schedule,
        allow_missing=allow_missing,
        lora=lora,
        vocab_parallel=vocab_parallel,
        sequence_parallel=sequence_parallel,
        selective_checkpointing=selective_checkpointing,
    )
    return verify_many(
        [job], pp=pp, dp=dp, tp=tp, zero_stage=zero_stage, tolerance=tolerance, workdir=workdir, top=top
    )[0]


def verify_many(
    jobs: list[VerifyJob],
    *,
    pp: int,
    dp: int = 1,
    tp: int = 1,
    zero_stage: int = 1,
    tolerance: float | None = None,
    workdir: str | Path | None = None,
    top: int = 5,
) -> list[VerifyResult]:
    """Check every job on one launch of ``pp * tp * dp`` ranks; each job gets its own engine and its own result."""
    check_settings(tolerance=tolerance)  # the jobs and the layout: prepare_jobs
    owner = tempfile.TemporaryDirectory(prefix="pptk-verify-") if workdir is None else None
    work = Path(owner.name) if owner is not None else Path(workdir)  # type: ignore[arg-type]  # workdir given
    try:
        prepared = prepare_jobs(jobs, pp=pp, dp=dp, tp=tp, zero_stage=zero_stage, work=work)
        return launch_jobs(
            prepared, pp=pp, dp=dp, tp=tp, zero_stage=zero_stage, work=work, tolerance=tolerance, top=top
        )
    finally:
        if owner is not None:
            owner.cleanup()


def prepare_jobs(
    jobs: list[VerifyJob], *, pp: int, dp: int = 1, tp: int = 1, zero_stage: int = 1, work: str | Path
) -> list[PreparedJob]:
    """The parent's half, before any rank starts: check the input, plan each job, save its model and batch under
    ``work/job{i}``, and run the Hugging Face reference step."""
    for job in jobs:  # the numbers and the layout, checked as `pptk plan` and the recipes check them
        check_settings(
            schedule=job.schedule,
            pp=pp,
            tp=tp,
            dp=dp,
            zero_stage=zero_stage,
            micro_batch_size=job.micro_batch_size,
            micro_batches=job.micro_batches,
            seq_len=job.seq_len,
            seed=job.seed,
        )
        if job.lora is not None and (problems := lora_layout_problems(tp=tp)):
            raise PptkError("; ".join(problems))
    jobs = [job if job.lora is None else replace(job, lora=settings_for_check(job.lora)) for job in jobs]
    plans = [_plan_job(job, pp=pp, tp=tp) for job in jobs]
    work = Path(work)
    prepared: list[PreparedJob] = []
    for i, (job, plan) in enumerate(zip(jobs, plans)):
        reference = reference_step(
            plan,
            work=work / f"job{i}",
            dp=dp,
            precision=job.precision,
            accum=grad_accum_dtype(job.precision, zero_stage),
            micro_batch_size=job.micro_batch_size,
            micro_batch_count=job.micro_batches,
            seq_len=job.seq_len,
            seed=job.seed,
            max_shard_size=job.max_shard_size,
            lora=job.lora,
        )
        prepared.append(PreparedJob(job, plan, reference, work / f"job{i}"))
    return prepared


def launch_jobs(
    prepared: list[PreparedJob],
    *,
    pp: int,
    dp: int = 1,
    tp: int = 1,
    zero_stage: int = 1,
    work: str | Path,
    tolerance: float | None = None,
    top: int = 5,
) -> list[VerifyResult]:
    """The ranks' half: one launch of ``pp * dp`` gloo ranks runs every prepared job, then each is compared.
    ``tolerance`` None: ``FP32_TOLERANCE`` or ``BF16_TOLERANCE``, by each job's precision."""
    work = Path(work)
    layout = dict(pp=pp, dp=dp, tp=tp, zero_stage=zero_stage)
    # the resolved task travels, so a rank never re-infers it from the saved directory
    # the resolved task and profiled costs travel, so every rank plans exactly what the parent planned
    jobs = [
        asdict(p.job) | {"model": str(p.job.model), "task": p.plan.task, "measured_ms": p.plan.stages.measured_ms}
        for p in prepared
    ]
    world = pp * tp * dp
    run_ranks(_verify_rank, world_size=world, args=(str(work), jobs, layout), log_dir=work / "logs")
    results = [[torch.load(p.work / f"result{r}.pt") for r in range(world)] for p in prepared]
    defaults = {"fp32": FP32_TOLERANCE, "bf16": BF16_TOLERANCE}
    return [
        compare(
            p.plan,
            p.reference,
            result,
            model=str(p.job.model),
            pp=pp,
            dp=dp,
            tp=tp,
            zero_stage=zero_stage,
            precision=p.job.precision,
            tolerance=defaults[p.job.precision] if tolerance is None else tolerance,
            top=top,
            allow_missing=p.job.allow_missing,
            lora=None if p.job.lora is None else asdict(p.job.lora),
        )
        for p, result in zip(prepared, results)
    ]


def _plan_job(job: VerifyJob, *, pp: int, tp: int = 1):
    if job.precision not in VERIFY_PRECISIONS:
        hint = (
            "; fp16 needs a GPU (DeepSpeed's CPU accelerator has fp16 only on CPUs with AVX512-FP16/AMX-FP16): "
            "verify in bf16, which checks the same low-precision path"
            if job.precision == "fp16"
            else ""
        )
        raise PptkError(f"--precision {job.precision!r}: verify runs {' or '.join(VERIFY_PRECISIONS)}{hint}")
    source = resolve_model(job.model)
    task = infer_task(source.config, job.task, source=source.label)
    if task == "reward" and job.micro_batch_size % 2:
        raise PptkError(
            f"--micro-batch-size {job.micro_batch_size}: a reward batch holds whole pairs; use an even size"
        )
    plan = plan_pipeline(
        replace(source, config=config_for_task(source.config, task)),
        num_stages=pp,
        task=task,
        partition_method=job.partition_method,
        attn_implementation=job.attn_implementation,
        dropout=False,
        seq_len=job.seq_len,
        schedule=job.schedule,
        micro_batch_size=job.micro_batch_size,
        tp=tp,
        vocab_parallel=job.vocab_parallel,
        sequence_parallel=job.sequence_parallel,
        recompute_attention=job.selective_checkpointing,
    )
    positions = max_positions(plan.config)
    if positions is not None and job.seq_len > positions:
        raise PptkError(
            f"--seq-len {job.seq_len} is longer than the model's {positions} positions; "
            f"use --seq-len {positions} or less"
        )
    if job.sequence_parallel:
        from pptk.parallel.sequence_parallel import check_sequence_lengths

        check_sequence_lengths(seq_len=job.seq_len, tp=tp)
    if job.lora is not None:  # a target that matches nothing is refused here, before any model is saved
        resolve_lora_targets(plan.layers, job.lora, task=plan.task)
    return plan
