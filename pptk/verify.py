# `pptk verify`: one training step through the real pipeline engine on CPU ranks, compared with Hugging Face.
"""The check a user runs before spending GPU hours: does this model convert exactly?

The parent process builds the Hugging Face model (random or pretrained), saves it, and runs the reference step:
forward and backward of every micro-batch, loss scaled as DeepSpeed scales it, one SGD step with lr=1 (so a
parameter's change *is* its gradient and any gradient error shows up undiluted). Then ``pp * dp`` gloo ranks build
the pipeline from the saved directory (each reading only its own tensors), run ``train_batch`` once with ZeRO, and
write their parameters back by Hugging Face name. Everything is fp32 with dropout off.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pptk.errors import PptkError
from pptk.launch import run_ranks
from pptk.models import first_tied_index
from pptk.pipeline import max_positions, pipeline_inputs, plan_pipeline, resolve_model
from pptk.tasks import synthetic_labels

LEARNING_RATE = 1.0


@dataclass(frozen=True)
class VerifyJob:
    """One model/task to check; several jobs share one launch of the ranks (start-up dominates on CPU)."""

    model: str | Path
    task: str = "causal-lm"
    micro_batch_size: int = 2
    micro_batches: int = 2
    seq_len: int = 32
    partition_method: str = "compute"
    attn_implementation: str = "sdpa"
    seed: int = 0
    # save the reference in shards of this size (e.g. "100KB") so the ranks load their stages from a sharded index
    max_shard_size: str | None = None


@dataclass
class VerifyResult:
    model: str
    model_type: str
    task: str
    pp: int
    dp: int
    zero_stage: int
    loss_pipeline: float
    loss_reference: float
    loss_rel_diff: float
    max_param_diff: float
    replica_max_diff: float  # largest difference between data-parallel replicas of the same parameter
    tolerance: float
    params_pipeline: int
    params_reference: int
    params_per_stage: list[int]
    stages: list[list[str]]
    largest_diffs: list[tuple[str, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "passed": self.passed}, indent=2)

    def describe(self) -> str:
        lines = [
            f"pptk verify {self.model} ({self.model_type}, {self.task}) pp={self.pp} dp={self.dp} "
            f"zero={self.zero_stage}",
            *(f"  stage {s}: {n:,} params  [{', '.join(layers)}]"
              for s, (n, layers) in enumerate(zip(self.params_per_stage, self.stages))),
            f"  parameters: pipeline {self.params_pipeline:,}  hugging face {self.params_reference:,}",
            f"  loss: pipeline {self.loss_pipeline:.8f}  hugging face {self.loss_reference:.8f}  "
            f"rel diff {self.loss_rel_diff:.2e}",
            f"  parameters after one step: max abs diff {self.max_param_diff:.2e} (tolerance {self.tolerance:.0e})",
        ]
        if self.dp > 1:
            lines.append(f"  data-parallel replicas: max abs diff {self.replica_max_diff:.2e}")
        lines += [f"    {diff:.2e}  {name}" for name, diff in self.largest_diffs]
        lines += [f"  FAIL: {p}" for p in self.problems] or ["  PASS"]
        return "\n".join(lines)


def _synthetic_batch(plan, *, batch_size: int, seq_len: int, seed: int) -> tuple[dict, torch.Tensor]:
    """Right-padded random batch: row lengths vary (first row full), non-zero token types where the model has them."""
    gen = torch.Generator().manual_seed(seed)
    config = plan.config
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=gen)
    lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (batch_size,), generator=gen)
    lengths[0] = seq_len
    attention_mask = (torch.arange(seq_len).unsqueeze(0) < lengths.unsqueeze(1)).long()
    pad_id = getattr(config, "pad_token_id", None) or 0
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_id)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "token_type_ids" in pipeline_inputs(plan):
        types = max(1, getattr(config, "type_vocab_size", 1))
        inputs["token_type_ids"] = torch.randint(0, types, (batch_size, seq_len), generator=gen) * attention_mask
    labels = synthetic_labels(plan.task, input_ids=input_ids, attention_mask=attention_mask, config=config,
                              generator=gen)
    return inputs, labels


def _micro_batches(inputs: dict, labels: torch.Tensor, names: tuple[str, ...], size: int):
    for start in range(0, labels.shape[0], size):
        yield tuple(inputs[n][start:start + size] for n in names), labels[start:start + size]


def _ds_config(*, micro_batch_size: int, micro_batches: int, dp: int, zero_stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "train_batch_size": micro_batch_size * micro_batches * dp,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # plain SGD: the exact check, not a training setup
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }


def _verify_rank(rank: int, workdir: str, jobs: list[dict], layout: dict) -> None:
    import deepspeed

    from pptk.launch import COLLECTIVE_TIMEOUT

    deepspeed.init_distributed(dist_backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    for index, job in enumerate(jobs):
        _verify_one(rank, Path(workdir) / f"job{index}", job, layout)


def _verify_one(rank: int, work: Path, job: dict, layout: dict) -> None:
    import deepspeed

    from pptk.pipeline import build_pipeline_module
    from pptk.weights import hf_names

    plan = plan_pipeline(resolve_model(work / "hf"), num_stages=layout["pp"], task=job["task"],
                         partition_method=job["partition_method"], attn_implementation=job["attn_implementation"],
                         dropout=False, seq_len=job["seq_len"])
    module = build_pipeline_module(plan)
    optimizer = torch.optim.SGD(module.parameters(), lr=LEARNING_RATE)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=_ds_config(
        micro_batch_size=job["micro_batch_size"], micro_batches=job["micro_batches"],
        dp=layout["dp"], zero_stage=layout["zero_stage"]))
    batch = torch.load(work / "batch.pt")
    micro = list(_micro_batches(batch["inputs"], batch["labels"], pipeline_inputs(plan), job["micro_batch_size"]))
    dp_rank = engine.grid.get_data_parallel_rank()
    per_replica = job["micro_batches"]
    loss = engine.train_batch(iter(micro[dp_rank * per_replica:(dp_rank + 1) * per_replica]))
    names = hf_names(engine.module, plan.layers)
    params = {names[k]: p.detach().clone() for k, p in engine.module.named_parameters()}
    torch.save({"loss": float(loss), "stage": engine.stage_id, "dp_rank": dp_rank, "params": params,
                "owned": _owned_names(engine.module, plan, names)}, work / f"result{rank}.pt")


def _owned_names(module, plan, names: dict[str, str]) -> list[str]:
    """HF names this stage counts as its own: a tied module counts on the first stage that holds it."""
    first_stage = {key: plan.stages.stage_of(index) for key, index in first_tied_index(plan.layers).items()}
    owned = []
    for key in dict(module.named_parameters()):
        if key.startswith("tied_modules."):
            tied_key = key.split(".")[1]
            if first_stage[tied_key] != module.stage_id:
                continue
        owned.append(names[key])
    return owned


def verify(model: str | Path, *, pp: int, dp: int = 1, task: str = "causal-lm", micro_batch_size: int = 2,
           micro_batches: int = 2, seq_len: int = 32, zero_stage: int = 1, partition_method: str = "compute",
           attn_implementation: str = "sdpa", tolerance: float = 1e-5, seed: int = 0,
           workdir: str | Path | None = None, top: int = 5) -> VerifyResult:
    job = VerifyJob(model, task=task, micro_batch_size=micro_batch_size, micro_batches=micro_batches,
                    seq_len=seq_len, partition_method=partition_method, attn_implementation=attn_implementation,
                    seed=seed)
    return verify_many([job], pp=pp, dp=dp, zero_stage=zero_stage, tolerance=tolerance, workdir=workdir, top=top)[0]


def verify_many(jobs: list[VerifyJob], *, pp: int, dp: int = 1, zero_stage: int = 1, tolerance: float = 1e-5,
                workdir: str | Path | None = None, top: int = 5) -> list[VerifyResult]:
    """Check every job on one launch of ``pp * dp`` ranks; each job gets its own engine and its own result."""
    if dp < 1:
        raise PptkError(f"dp must be at least 1, got {dp}")
    if zero_stage not in (0, 1) and pp > 1:
        raise PptkError(f"ZeRO stage {zero_stage} with pp={pp}: DeepSpeed's pipeline engine supports ZeRO stage 0 "
                        "or 1 only; use --zero-stage 1")
    plans = [_plan_job(job, pp=pp) for job in jobs]
    owner = tempfile.TemporaryDirectory(prefix="pptk-verify-") if workdir is None else None
    work = Path(workdir or owner.name)
    try:
        references = [_reference_step(plan, job, work=work / f"job{i}", dp=dp)
                      for i, (job, plan) in enumerate(zip(jobs, plans))]
        layout = dict(pp=pp, dp=dp, zero_stage=zero_stage)
        run_ranks(_verify_rank, world_size=pp * dp, args=(str(work), [asdict(j) | {"model": str(j.model)}
                                                                      for j in jobs], layout),
                  log_dir=work / "logs")
        results = [[torch.load(work / f"job{i}" / f"result{r}.pt") for r in range(pp * dp)]
                   for i in range(len(jobs))]
    finally:
        if owner is not None:
            owner.cleanup()
    return [_compare(plan, reference, result, model=str(job.model), pp=pp, dp=dp, zero_stage=zero_stage,
                     tolerance=tolerance, top=top)
            for job, plan, reference, result in zip(jobs, plans, references, results)]


def _plan_job(job: VerifyJob, *, pp: int):
    if job.micro_batch_size < 1 or job.micro_batches < 1:
        raise PptkError(f"micro_batch_size ({job.micro_batch_size}) and micro_batches ({job.micro_batches}) must "
                        "be at least 1")
    plan = plan_pipeline(resolve_model(job.model), num_stages=pp, task=job.task,
                         partition_method=job.partition_method, attn_implementation=job.attn_implementation,
                         dropout=False, seq_len=job.seq_len)
    positions = max_positions(plan.config)
    if positions is not None and job.seq_len > positions:
        raise PptkError(f"--seq-len {job.seq_len} is longer than the model's {positions} positions; "
                        f"use --seq-len {positions} or less")
    return plan


def _reference_step(plan, job: VerifyJob, *, work: Path, dp: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    hf_class = plan.hf_class
    torch.manual_seed(job.seed)
    if plan.source.pretrained_dir is not None:
        model = hf_class.from_pretrained(plan.source.pretrained_dir, config=plan.config)
    else:
        model = hf_class(plan.config)
    shards = {"max_shard_size": job.max_shard_size} if job.max_shard_size else {}
    model.save_pretrained(work / "hf", **shards)  # the ranks load their stages from here, tensor by tensor
    micro_batch_size, micro_batches = job.micro_batch_size, job.micro_batches
    inputs, labels = _synthetic_batch(plan, batch_size=micro_batch_size * micro_batches * dp, seq_len=job.seq_len,
                                      seed=job.seed)
    torch.save({"inputs": inputs, "labels": labels}, work / "batch.pt")

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    losses = []
    total = micro_batches * dp
    names = tuple(inputs)
    for micro_inputs, micro_labels in _micro_batches(inputs, labels, names, micro_batch_size):
        loss = model(**dict(zip(names, micro_inputs)), labels=micro_labels).loss
        (loss / total).backward()  # DeepSpeed: mean over micro-batches, then mean over replicas
        losses.append(loss.item())
    optimizer.step()
    return {"loss": sum(losses) / len(losses),
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "num_parameters": model.num_parameters()}


def _compare(plan, reference: dict, results: list[dict], *, model: str, pp: int, dp: int, zero_stage: int,
             tolerance: float, top: int) -> VerifyResult:
    problems = []
    ref_params = reference["params"]
    diffs: dict[str, float] = {}
    replica_diff = 0.0
    by_name: dict[str, list[torch.Tensor]] = {}
    for result in results:
        for name, tensor in result["params"].items():
            by_name.setdefault(name, []).append(tensor)
    for name, copies in by_name.items():
        if name not in ref_params:
            problems.append(f"pipeline parameter {name} has no Hugging Face counterpart")
            continue
        diffs[name] = max((c - ref_params[name]).abs().max().item() for c in copies)
        replica_diff = max([replica_diff] + [(c - copies[0]).abs().max().item() for c in copies[1:]])
    missing = sorted(set(ref_params) - set(by_name))
    if missing:
        problems.append(f"Hugging Face parameters missing from the pipeline: {', '.join(missing[:5])}")

    replica0 = [r for r in results if r["dp_rank"] == 0]
    per_stage = [0] * pp
    for result in replica0:
        per_stage[result["stage"]] = sum(result["params"][n].numel() for n in result["owned"])
    params_pipeline = sum(per_stage)
    if params_pipeline != reference["num_parameters"]:
        problems.append(f"parameter count {params_pipeline:,} != Hugging Face's {reference['num_parameters']:,}")

    loss_pipeline = results[0]["loss"]
    losses = {round(r["loss"], 12) for r in results}
    if len(losses) > 1:
        problems.append(f"ranks report different losses: {sorted(losses)}")
    rel = abs(loss_pipeline - reference["loss"]) / max(abs(reference["loss"]), 1e-12)
    if rel > tolerance:
        problems.append(f"loss relative difference {rel:.2e} > {tolerance:.0e}")
    max_diff = max(diffs.values(), default=0.0)
    if max_diff > tolerance:
        worst = max(diffs, key=diffs.get)
        problems.append(f"parameter {worst} differs by {max_diff:.2e} after one step (> {tolerance:.0e})")
    if replica_diff > 0.0 and dp > 1:
        problems.append(f"data-parallel replicas disagree by {replica_diff:.2e}")
    largest = sorted(diffs.items(), key=lambda kv: -kv[1])[:top]
    return VerifyResult(
        model=model, model_type=plan.config.model_type, task=plan.task, pp=pp, dp=dp, zero_stage=zero_stage,
        loss_pipeline=loss_pipeline, loss_reference=reference["loss"], loss_rel_diff=rel, max_param_diff=max_diff,
        replica_max_diff=replica_diff, tolerance=tolerance, params_pipeline=params_pipeline,
        params_reference=reference["num_parameters"], params_per_stage=per_stage,
        stages=[[f"{c.index}:{c.name}" for c in plan.stages.stage_layers(s)] for s in range(pp)],
        largest_diffs=largest, problems=problems,
    )
