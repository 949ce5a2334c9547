# Memory and step-time forecasts of layouts, and the layout advisor behind `pptk plan --gpus N`: pure arithmetic.
"""Memory per rank = the parameters it holds x the bytes DeepSpeed keeps per parameter (measured on CPU ranks,
``TRAIN_BYTES``) + its activations (``pptk.parallel.activations``, counted from the real modules on CPU).

Step time is modelled, not measured: the slowest stage's FLOPs per micro-batch (``pptk.parallel.partition``'s
cost model: 3 x forward, 4 x for recomputed blocks) at ``tflops x mfu``, times the 1F1B step of m + pp - 1 slots.
Communication (tp all-reduces, pp sends, the dp gradient all-reduce) and the optimizer step are not modelled.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from pptk.errors import PptkError
from pptk.parallel.activations import BlockShape, rank_activation_bytes, stage_activations
from pptk.parallel.partition import LayerCost, StagePlan, plan_stages

# Training memory per parameter with Adam under DeepSpeed 0.19.8's ZeRO-1 wrappers, as (held whole by every replica,
# split over dp by ZeRO-1). Measured on CPU ranks by benchmarks/plan_memory.py (weights, gradients, DeepSpeed's
# flat gradient buffers; fp32 master copy and Adam moments), not counted from a list: the wrappers keep more than
# the textbook 2 + 2 + 12, and the allocator's share shows too. fp16 cannot run on these CPUs: modelled as fp32's
# split with 2-byte weights and gradients.
TRAIN_BYTES = {"fp32": (14.0, 18.0), "bf16": (13.0, 12.0), "fp16": (8.0, 18.0)}
# A weight LoRA freezes costs its bytes alone: no gradient, no optimizer state (DeepSpeed casts it to the precision).
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}
GIB = 2**30


def bytes_per_param(precision: str, *, dp: int, zero_stage: int) -> float:
    """Training memory per parameter a rank holds (activations excluded): see TRAIN_BYTES."""
    whole, split = TRAIN_BYTES[precision]
    return whole + split / (dp if zero_stage >= 1 else 1)


def parse_memory(text: str) -> float:
    """'80GB', '80GiB', '141G' or '0.5TB' as bytes; GB means GiB here, as GPU makers' "80GB" cards do."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(G|GB|GiB|T|TB|TiB)\s*", text, re.IGNORECASE)
    if found is None or float(found[1]) <= 0:
        raise PptkError(f"--gpu-memory {text!r}: give a size such as 80GB, 141GB or 0.5TB")
    return float(found[1]) * (2**40 if found[2].upper().startswith("T") else GIB)


@dataclass(frozen=True)
class LoraCounts:
    """Per layer: LoRA's adapter parameters and the parameters of modules it trains in full (modules_to_save)."""

    adapters: tuple[int, ...]
    trained_in_full: tuple[int, ...]


def stage_train_state_bytes(
    held: tuple[LayerCost, ...],
    *,
    tp: int,
    dp: int,
    precision: str,
    zero_stage: int,
    lora: LoraCounts | None,
    vocab_layers: frozenset[int] = frozenset(),
) -> float:
    """Weights, gradients and optimizer state of one tp rank of a stage: blocks split tp ways (their few
    replicated norm weights counted as split too), and so the embedding and LM head in ``vocab_layers`` (split by
    vocabulary); any other embedding or head whole."""
    per_param = bytes_per_param(precision, dp=dp, zero_stage=zero_stage)
    params = sum(c.params / tp if c.role == "block" or c.index in vocab_layers else c.params for c in held)
    if lora is None:
        return params * per_param
    adapters = sum(lora.adapters[c.index] for c in held)
    full = sum(lora.trained_in_full[c.index] for c in held)
    return (params - full) * WEIGHT_BYTES[precision] + (adapters + full) * per_param


@dataclass(frozen=True)
class Workload:
    """What one step trains, shared by every layout the advisor weighs."""

    shape: BlockShape
    costs: tuple[LayerCost, ...]
    seq_len: int
    global_batch_size: int  # sequences per step
    precision: str = "bf16"
    lora: LoraCounts | None = None
    schedule: str = "1f1b"
    # the layers split by vocabulary at tp > 1 (pptk.parallel.vocab_parallel); empty: replicated on every tp rank
    vocab_layers: frozenset[int] = frozenset()
    sequence_parallel: bool = False  # at tp > 1 (pptk.parallel.sequence_parallel)
    recompute_attention: bool = False  # selective checkpointing (pptk.parallel.recompute)


@dataclass(frozen=True)
class Hardware:
    gpus: int
    memory_bytes: float
    tflops: float  # dense peak per GPU at the precision
    mfu: float = 0.4  # the share of it the layers reach (modelled)
    node_size: int = 8  # tp stays within a node
    usable: float = 0.9  # the rest: CUDA context, communication buffers, fragmentation (modelled)


@dataclass(frozen=True)
class Candidate:
    pp: int
    tp: int
    dp: int
    micro_batch_size: int
    checkpoint_interval: int  # 0: off; 1: every block recomputed
    zero_stage: int = 1


@dataclass(frozen=True)
class Forecast:
    candidate: Candidate
    micro_batches: int = 0  # per step per replica
    step_seconds: float = 0.0
    bubble: float = 0.0
    rank_bytes: tuple[float, ...] = ()  # per pipeline rank: train state + activations
    rank_train_state: tuple[float, ...] = ()
    problem: str | None = None  # why it does not fit or cannot run; None: it does

    @property
    def peak_bytes(self) -> float:
        return max(self.rank_bytes, default=0.0)

    @property
    def peak_rank(self) -> int:
        return max(range(len(self.rank_bytes)), key=lambda r: self.rank_bytes[r]) if self.rank_bytes else 0


def rank_memory(
    stages: StagePlan,
    workload: Workload,
    *,
    tp: int,
    dp: int,
    zero_stage: int,
    micro_batch_size: int,
    micro_batches: int,
    checkpoint_interval: int,
) -> tuple[list[float], list[float]]:
    """(train state, activations) bytes per pipeline rank of this plan."""
    pp = stages.num_ranks
    train, acts = [], []
    for rank in range(pp):
        held = stages.rank_stages(rank)
        train.append(
            sum(
                stage_train_state_bytes(
                    stages.stage_layers(s),
                    tp=tp,
                    dp=dp,
                    precision=workload.precision,
                    zero_stage=zero_stage,
                    lora=workload.lora,
                    vocab_layers=workload.vocab_layers,
                )
                for s in held
            )
        )
        per_stage = [
            stage_activations(
                [c.role for c in stages.stage_layers(s)],
                workload.shape,
                micro_batch_size=micro_batch_size,
                seq_len=workload.seq_len,
                precision=workload.precision,
                tp=tp,
                vocab_split=bool(workload.vocab_layers),
                sequence_parallel=workload.sequence_parallel and tp > 1,
                recompute_attention=workload.recompute_attention,
                checkpoint_interval=checkpoint_interval,
                first=s == 0,
                last=s == stages.num_stages - 1,
            )
            for s in held
        ]
        acts.append(
            rank_activation_bytes(workload.schedule, pp=pp, micro_batches=micro_batches, rank=rank, stages=per_stage)
        )
    return train, acts


def step_seconds(stages: StagePlan, workload: Workload, hardware: Hardware, candidate: Candidate, m: int) -> float:
    """(m + pp - 1) slots of the slowest stage's forward and backward of one micro-batch (1F1B)."""
    recompute = 4.0 if candidate.checkpoint_interval else 3.0
    tokens = candidate.micro_batch_size * workload.seq_len
    slowest = max(
        sum(
            c.flops_per_token * (recompute if c.role == "block" else 3.0) / _split(c, candidate.tp, workload)
            for c in stages.stage_layers(s)
        )
        for s in range(stages.num_stages)
    )
    return (m + candidate.pp - 1) * slowest * tokens / (hardware.tflops * 1e12 * hardware.mfu)


def candidates(hardware: Hardware, *, micro_batch_sizes: tuple[int, ...]) -> list[Candidate]:
    """Every pp x tp x dp = gpus grid, micro-batch size and checkpointing choice (ZeRO-1: the most with pp > 1)."""
    out = []
    for pp in _divisors(hardware.gpus):
        for tp in _divisors(hardware.gpus // pp):
            for mbs in micro_batch_sizes:
                for interval in (0, 1):
                    out.append(Candidate(pp, tp, hardware.gpus // (pp * tp), mbs, interval))
    return out


def forecast(
    candidate: Candidate,
    workload: Workload,
    hardware: Hardware,
    *,
    stages: StagePlan | None,
    tp_problem: str | None,
) -> Forecast:
    """One layout's forecast, or the first reason it cannot run. ``stages``: the plan for candidate.pp (None when
    the model cannot be cut that many ways, with the reason in ``tp_problem``'s place)."""
    c = candidate
    if c.tp > hardware.node_size:
        return Forecast(c, problem=f"tp({c.tp}) > {hardware.node_size} GPUs per node: tp stays within a node")
    if tp_problem is not None:
        return Forecast(c, problem=tp_problem)
    if stages is None:
        raise RuntimeError("forecast: a plan is needed when there is no problem")
    replica_batch = c.dp * c.micro_batch_size
    if workload.global_batch_size % replica_batch:
        return Forecast(
            c,
            problem=f"global batch {workload.global_batch_size} is not a multiple of dp({c.dp}) x micro-batch "
            f"({c.micro_batch_size})",
        )
    m = workload.global_batch_size // replica_batch
    train, acts = rank_memory(
        stages,
        workload,
        tp=c.tp,
        dp=c.dp,
        zero_stage=c.zero_stage,
        micro_batch_size=c.micro_batch_size,
        micro_batches=m,
        checkpoint_interval=c.checkpoint_interval,
    )
    totals = tuple(t + a for t, a in zip(train, acts))
    usable = hardware.memory_bytes * hardware.usable
    result = Forecast(
        c,
        micro_batches=m,
        step_seconds=step_seconds(stages, workload, hardware, c, m),
        bubble=(c.pp - 1) / (m + c.pp - 1),
        rank_bytes=totals,
        rank_train_state=tuple(train),
    )
    if result.peak_bytes > usable:
        over = (result.peak_bytes - usable) / GIB
        return dataclasses.replace(result, problem=f"out of memory on stage {result.peak_rank} by {over:.1f} GiB")
    return result


def advise(
    workload: Workload,
    hardware: Hardware,
    *,
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
    tp_problem=lambda tp: None,
) -> list[Forecast]:
    """Every candidate layout's forecast: those that fit first, fastest first; then the rest, least memory first.
    ``tp_problem(tp)``: why the model cannot take this tp (family, heads), or None."""
    plans: dict[int, StagePlan | str] = {}
    for pp in _divisors(hardware.gpus):
        try:
            plans[pp] = plan_stages(list(workload.costs), num_stages=pp, method="compute")
        except PptkError as error:
            plans[pp] = str(error)
    results = []
    for c in candidates(hardware, micro_batch_sizes=micro_batch_sizes):
        plan = plans[c.pp]
        problem = plan if isinstance(plan, str) else tp_problem(c.tp)
        results.append(
            forecast(c, workload, hardware, stages=None if isinstance(plan, str) else plan, tp_problem=problem)
        )
    fits = sorted((f for f in results if f.problem is None), key=lambda f: (f.step_seconds, f.peak_bytes))
    rest = sorted((f for f in results if f.problem is not None), key=lambda f: (not f.rank_bytes, f.peak_bytes))
    return fits + rest


def _split(cost: LayerCost, tp: int, workload: Workload) -> int:
    """How many ways tp splits this layer's work: blocks and vocabulary-split layers tp ways, the rest not."""
    return tp if cost.role == "block" or cost.index in workload.vocab_layers else 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
