# `pptk verify`'s comparison of the ranks' parameters with Hugging Face's step (pptk.verify.reference), fp32 or bf16.
"""fp32: the pipeline's parameters after one SGD step (lr=1) must equal Hugging Face's to ``FP32_TOLERANCE``.

bf16: both sides round to bf16 (unit roundoff u = 2^-8) after every operation, so their gradients can differ by
rounding alone, and by much more than u relative to a gradient whose terms cancel (LayerNorm weights, or the key
bias, whose exact gradient is zero). A fixed relative tolerance is therefore either too loose for most tensors or
fails on some. Instead each tensor's allowance is measured: the same Hugging Face step in fp32 on the same (bf16-
rounded) weights gives the exact gradient, and Hugging Face's own bf16 error against it is that tensor's rounding
noise. The pipeline passes when, for every tensor and for the loss,

    |pipeline - HF bf16|  <=  BF16_TOLERANCE * (|HF bf16 - HF fp32| + u * |HF bf16|)        (norms per tensor)

Two correct bf16 implementations err independently by about the same amount, so their distance is about sqrt(2)
times either's error; 4 leaves room for the extra roundings a pipeline adds (tied-weight gradients summed after
accumulation, activations handed over between stages) and is still far below what a wrong weight mapping or a
wrong mask produces (tens to thousands of times the noise; tests/distributed/test_bf16.py shows both failing).
The u * |HF bf16| term is one rounding of the gradient itself, the finest difference bf16 can express.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from pptk.models.heads import HeadGaps, head_gaps

FP32_TOLERANCE = 1e-5
BF16_TOLERANCE = 4.0  # in units of Hugging Face's own bf16 rounding noise, see above
BF16_UNIT_ROUNDOFF = 2.0**-8


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
    # fp32: largest absolute parameter difference after the step; bf16: largest gradient difference in units of
    # Hugging Face's own bf16 noise (see the module docstring)
    max_param_diff: float
    replica_max_diff: float  # largest difference between data-parallel replicas of the same parameter
    tolerance: float
    params_pipeline: int
    params_reference: int
    params_per_stage: list[int]
    stages: list[list[str]]
    largest_diffs: list[tuple[str, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    precision: str = "fp32"
    loss_noise_units: float = 0.0  # bf16: the loss difference in units of Hugging Face's bf16 loss error
    schedule: str = "1f1b"
    tp: int = 1  # tensor-parallel shards per stage; their slices are gathered back to Hugging Face shapes
    params_per_rank: list[int] = field(default_factory=list)  # parameters each global rank holds itself
    lora: dict | None = None  # the LoRA settings checked (pptk.verify.lora); None: full fine-tuning
    params_trained: int = 0  # with LoRA: adapters and modules_to_save (every parameter without)
    frozen_tensors: int = 0  # with LoRA: frozen weights compared (they must not move)
    frozen_max_diff: float = 0.0  # their largest difference from Hugging Face's after the step
    largest_update: float = 0.0  # the largest change the pipeline's step made to a trained parameter
    fresh_heads: list[str] = field(default_factory=list)  # head tensors the checkpoint lacks, freshly initialised
    dropped_heads: list[str] = field(default_factory=list)  # the checkpoint's own task head, unused by this task
    vocab_split: str = ""  # tp > 1: how the embedding, LM head and loss split the vocabulary ("" replicated)

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "passed": self.passed}, indent=2)

    def describe(self) -> str:
        if self.precision == "fp32":
            measure = (
                f"parameters after one step: max abs diff {self.max_param_diff:.2e} (tolerance {self.tolerance:.0e})"
            )
        else:
            measure = (
                f"gradients vs Hugging Face in bf16, in units of its own bf16 error: max "
                f"{self.max_param_diff:.2f} (tolerance {self.tolerance:g}); loss {self.loss_noise_units:.2f}"
            )
        lines = [
            f"pptk verify {self.model} ({self.model_type}, {self.task}) pp={self.pp} tp={self.tp} dp={self.dp} "
            f"zero={self.zero_stage} {self.precision} {self.schedule}",
            *(
                f"  rank {s}: {n:,} params  [{', '.join(layers)}]"
                for s, (n, layers) in enumerate(zip(self.params_per_stage, self.stages))
            ),
            f"  parameters: pipeline {self.params_pipeline:,}  hugging face {self.params_reference:,}",
            f"  loss: pipeline {self.loss_pipeline:.8f}  hugging face {self.loss_reference:.8f}  "
            f"rel diff {self.loss_rel_diff:.2e}",
            f"  {measure}",
        ]
        if self.lora is not None:
            lines.append(
                f"  LoRA r={self.lora['r']} alpha={self.lora['alpha']:g} (dropout off for the check): "
                f"{self.params_trained:,} parameters trained (largest update {self.largest_update:.2e}); "
                f"{self.frozen_tensors} frozen tensors, max abs diff {self.frozen_max_diff:.2e} from Hugging Face's "
                "after the step (must be 0)"
            )
        if self.fresh_heads:
            lines.append(
                f"  freshly initialised (the checkpoint has no {self.task} head, as Hugging Face would): "
                + ", ".join(self.fresh_heads)
            )
        if self.dropped_heads:
            lines.append(f"  unused (the checkpoint's own task head): {', '.join(self.dropped_heads)}")
        if self.tp > 1:
            lines.append(f"  vocabulary: {self.vocab_split or 'replicated on every tp rank'}")
            lines.append(f"  held per rank: {', '.join(f'{n:,}' for n in self.params_per_rank)} parameters")
        if self.dp > 1 or self.tp > 1:
            lines.append(f"  replicas (dp and tp ranks): max abs diff {self.replica_max_diff:.2e}")
        lines += [f"    {diff:.2e}  {name}" for name, diff in self.largest_diffs]
        lines += [f"  FAIL: {p}" for p in self.problems] or ["  PASS"]
        return "\n".join(lines)


def _difference(name: str, copy: torch.Tensor, reference: dict, precision: str) -> float:
    """fp32: the largest absolute parameter difference. bf16: the gradient difference in noise units."""
    if precision == "fp32":
        return (copy - reference["params"][name]).abs().max().item()
    start = reference["start"][name]
    grad_pipeline, grad_reference = start - copy, start - reference["params"][name]
    allowance = reference["noise"][name] + BF16_UNIT_ROUNDOFF * grad_reference.norm().item()
    return (grad_pipeline - grad_reference).norm().item() / max(allowance, 1e-30)


def _vocab_split(plan) -> str:
    vocab = plan.vocab
    if vocab is None:
        return ""
    padding = f", padded to {vocab.padded}" if vocab.padded != vocab.vocab_size else ""
    sequence = "; sequence parallel" if plan.sequence_parallel else ""
    return (
        f"split over tp={vocab.tp}, {vocab.padded // vocab.tp:,} rows per rank ({vocab.vocab_size:,}{padding})"
        + sequence
    )


def checkpoint_gaps(plan, reference: dict) -> HeadGaps:
    """What Hugging Face reported missing from or unexpected in the checkpoint, sorted (pptk.models.heads.head_gaps)."""
    return head_gaps(
        plan.layers,
        plan.config,
        plan.task,
        base_model_prefix=plan.hf_class.base_model_prefix,
        missing=reference.get("missing_keys") or [],
        unexpected=reference.get("unexpected_keys") or [],
    )


def gap_problems(gaps: HeadGaps, *, allow_missing: bool) -> list[str]:
    """Both sides initialise a tensor the checkpoint lacks the same way and would agree: a parity check that passed
    there would prove nothing about the weights, so it fails, unless the gap is what Hugging Face expects (a head the
    checkpoint's architecture never had, or its own task's head left unused) or --allow-missing is given."""
    if allow_missing:
        return []
    return [
        f"{len(keys)} tensor(s) {what} the checkpoint: {', '.join(keys[:8])}"
        + (" ..." if len(keys) > 8 else "")
        + " (pass --allow-missing when that is expected)"
        for keys, what in ((gaps.missing, "missing from"), (gaps.unexpected, "unexpected in"))
        if keys
    ]


def compare(
    plan,
    reference: dict,
    results: list[dict],
    *,
    model: str,
    pp: int,
    dp: int,
    zero_stage: int,
    precision: str,
    tolerance: float,
    top: int,
    allow_missing: bool = False,
    tp: int = 1,
    lora: dict | None = None,
) -> VerifyResult:
    gaps = checkpoint_gaps(plan, reference)
    problems = gap_problems(gaps, allow_missing=allow_missing)
    ref_params = reference["params"]
    frozen = reference.get("frozen", set())  # LoRA: weights the step must leave exactly as they are
    diffs: dict[str, float] = {}
    frozen_diffs: dict[str, float] = {}
    updates: dict[str, float] = {}  # how far the pipeline's step moved each trained parameter
    replica_diff = 0.0
    by_name: dict[str, list[torch.Tensor]] = {}
    for result in results:
        for name, tensor in result["params"].items():
            by_name.setdefault(name, []).append(tensor)
    for name, copies in by_name.items():
        if name not in ref_params:
            problems.append(f"pipeline parameter {name} has no Hugging Face counterpart")
            continue
        if name in frozen:
            frozen_diffs[name] = max((c - reference["start"][name]).abs().max().item() for c in copies)
        else:
            diffs[name] = max(_difference(name, c, reference, precision) for c in copies)
            updates[name] = max((c - reference["start"][name]).abs().max().item() for c in copies)
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
    loss_diff = abs(loss_pipeline - reference["loss"])
    rel = loss_diff / max(abs(reference["loss"]), 1e-12)
    loss_units = 0.0
    if precision == "fp32" and rel > tolerance:
        problems.append(f"loss relative difference {rel:.2e} > {tolerance:.0e}")
    if precision == "bf16":
        loss_units = loss_diff / max(reference["loss_noise"] + BF16_UNIT_ROUNDOFF * abs(reference["loss"]), 1e-30)
        if loss_units > tolerance:
            problems.append(f"loss differs by {loss_units:.1f} x Hugging Face's own bf16 error (> {tolerance:g})")
    max_diff = max(diffs.values(), default=0.0)
    if max_diff > tolerance:
        worst = max(diffs, key=lambda name: diffs[name])
        problems.append(
            f"parameter {worst} differs by {max_diff:.2e} after one step (> {tolerance:.0e})"
            if precision == "fp32"
            else f"the gradient of {worst} differs by {max_diff:.1f} x Hugging Face's own bf16 error (> {tolerance:g})"
        )
    frozen_max = max(frozen_diffs.values(), default=0.0)
    still = sorted(name for name, update in updates.items() if update == 0.0)
    if lora is not None and still:  # B = 0 (peft's start) would leave every lora_A here and prove little
        problems.append(
            f"{len(still)} trained tensor(s) did not change in the step ({', '.join(still[:3])}): the adapters "
            "must be non-zero for the check to test them"
        )
    if frozen_max > 0.0:
        moved = max(frozen_diffs, key=lambda name: frozen_diffs[name])
        problems.append(
            f"frozen weight {moved} differs from Hugging Face's by {frozen_max:.2e} after the step; with LoRA "
            "only the adapters and modules_to_save may change"
        )
    if replica_diff > 0.0 and (dp > 1 or tp > 1):
        # tp ranks hold the same replicated tensors (norms, embeddings) and, gathered, the same full sharded ones
        problems.append(f"replicas (dp or tp ranks) disagree by {replica_diff:.2e}")
    largest = sorted(diffs.items(), key=lambda kv: -kv[1])[:top]
    return VerifyResult(
        model=model,
        model_type=plan.config.model_type,
        task=plan.task,
        pp=pp,
        dp=dp,
        tp=tp,
        params_per_rank=[r.get("local_numel", 0) for r in results],
        vocab_split=_vocab_split(plan),
        zero_stage=zero_stage,
        loss_pipeline=loss_pipeline,
        loss_reference=reference["loss"],
        loss_rel_diff=rel,
        max_param_diff=max_diff,
        replica_max_diff=replica_diff,
        tolerance=tolerance,
        params_pipeline=params_pipeline,
        params_reference=reference["num_parameters"],
        params_per_stage=per_stage,
        schedule=plan.stages.schedule,
        stages=[[f"{c.index}:{c.name}" for c in plan.stages.rank_layers(r)] for r in range(pp)],
        largest_diffs=largest,
        problems=problems,
        precision=precision,
        loss_noise_units=loss_units,
        lora=lora,
        params_trained=sum(ref_params[name].numel() for name in ref_params if name not in frozen),
        frozen_tensors=len(frozen_diffs),
        frozen_max_diff=frozen_max,
        largest_update=max(updates.values(), default=0.0),
        fresh_heads=gaps.fresh,
        dropped_heads=gaps.dropped,
    )
