# Memory and step-time forecasts of layouts, and the layout advisor behind `pptk plan --gpus N`: pure arithmetic.
"""Memory per rank = the parameters it holds x the bytes DeepSpeed's wrappers keep per parameter (``TRAIN_BYTES``) +
the larger of its activations (``pptk.parallel.activations``, counted from the real modules on CPU) and what the
optimizer step adds (``STEP_BYTES``): the step runs after the last backward. Checked against CPU ranks' peaks by
benchmarks/plan_memory.py.

Step time is modelled, not measured: the slowest stage's FLOPs per micro-batch (``pptk.parallel.partition``'s cost
model: 3 x forward, 4 x for recomputed blocks, 3 x plus the attention's forward under selective checkpointing) at
``tflops x mfu``, times the 1F1B step of m + pp - 1 slots. Communication (tp all-reduces, pp sends, the dp gradient
all-reduce) and the optimizer step are not modelled.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from pptk.errors import PptkError
from pptk.parallel.activations import BlockShape, rank_activation_bytes, stage_activations
from pptk.parallel.partition import LayerCost, StagePlan, plan_stages

# Training memory per parameter with Adam under DeepSpeed 0.19.8's ZeRO-1 wrappers while micro-batches run, as (held
# whole by every replica, split over dp by ZeRO-1): the wrappers' own tensors, counted on CPU ranks and checked
# against their peaks by benchmarks/plan_memory.py.
# - fp32 (DeepSpeedZeroOptimizer): weights 4 + gradients 4 whole; the fp32 master copy 4 + Adam's moments 8 split.
# - bf16 (BF16_Optimizer, fp32 gradient accumulation): bf16 weights 2 + bf16 gradients 2 + fp32 accumulated
#   gradients 4 whole; fp32 master 4 + moments 8 split.
# - fp16 cannot run on these CPUs: modelled as fp32's wrapper with 2-byte weights and gradients.
TRAIN_BYTES = {"fp32": (8.0, 12.0), "bf16": (8.0, 12.0), "fp16": (4.0, 12.0)}
# What the optimizer step adds per parameter, split over dp, at a moment no activation is alive: DeepSpeedZeroOptimizer
# reduces into an fp32 gradient partition (4) and its Adam step makes temporaries as large (4, measured).
# BF16_Optimizer steps on the fp32 gradients it already holds (measured: nothing).
STEP_BYTES = {"fp32": 8.0, "bf16": 0.0, "fp16": 8.0}
# BF16_Optimizer (the shipped bf16 config: fp32 gradient accumulation) adds each bf16 gradient into its fp32 buffer
# after every micro-batch's backward through an fp32 copy of that gradient, one tensor at a time: the largest
# tensor's copy is the peak (measured: 4 bytes x the embedding on each stage that holds one).
GRADIENT_COPY_BYTES = {"bf16": 4.0}
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


def stage_memory_bytes(
    held: tuple[LayerCost, ...],
    *,
    tp: int,
    dp: int,
    precision: str,
    zero_stage: int,
    lora: LoraCounts | None,
    vocab_layers: frozenset[int] = frozenset(),
) -> tuple[float, float]:
    """(weights, gradients and optimizer state; what the optimizer step adds) of one tp rank of a stage: blocks split
    tp ways (their few replicated norm weights counted as split too), and so the embedding and LM head in
    ``vocab_layers`` (split by vocabulary); any other embedding or head whole. LoRA: the frozen weights at their
    bytes alone, and only the trained parameters in the step."""
    params, trained = _held_and_trained(held, tp=tp, lora=lora, vocab_layers=vocab_layers)
    per_param = bytes_per_param(precision, dp=dp, zero_stage=zero_stage)
    state = (params - trained) * WEIGHT_BYTES[precision] + trained * per_param
    return state, trained * STEP_BYTES[precision] / (dp if zero_stage >= 1 else 1)


def largest_gradient(
    held: tuple[LayerCost, ...],
    shape: BlockShape,
    *,
    tp: int,
    lora: LoraCounts | None,
    vocab_layers: frozenset[int] = frozenset(),
) -> float:
    """Elements of the largest gradient one tp rank of a stage holds: an embedding or head matrix (split by
    vocabulary in ``vocab_layers``) or a block's [hidden, intermediate] MLP weight. Modelled from the config: a
    fused or 3-D expert weight is larger. Under LoRA only the small adapters (and modules_to_save) have gradients."""
    if lora is not None:
        return 0.0
    sizes = [c.params / (tp if c.index in vocab_layers else 1) for c in held if c.role != "block"]
    if any(c.role == "block" for c in held):
        sizes.append(shape.hidden * shape.intermediate / tp)
    return max(sizes, default=0.0)


def _held_and_trained(
    held: tuple[LayerCost, ...], *, tp: int, lora: LoraCounts | None, vocab_layers: frozenset[int]
) -> tuple[float, float]:
    """(parameters one tp rank holds, those of them that train)."""
    params = sum(c.params / tp if c.role == "block" or c.index in vocab_layers else c.params for c in held)
    if lora is None:
        return params, params
    adapters = sum(lora.adapters[c.index] for c in held)
    full = sum(lora.trained_in_full[c.index] for c in held)
    return params - full + adapters + full, adapters + full


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
    selective: bool = False  # each block's attention recomputed (with checkpoint_interval 0)


@dataclass(frozen=True)
class Forecast:
    candidate: Candidate
    micro_batches: int = 0  # per step per replica
    step_seconds: float = 0.0
    bubble: float = 0.0
    rank_bytes: tuple[float, ...] = ()  # per pipeline rank: RankMemory.totals
    rank_train_state: tuple[float, ...] = ()
    problem: str | None = None  # why it does not fit or cannot run; None: it does

    @property
    def peak_bytes(self) -> float:
        return max(self.rank_bytes, default=0.0)

    @property
    def peak_rank(self) -> int:
        return max(range(len(self.rank_bytes)), key=lambda r: self.rank_bytes[r]) if self.rank_bytes else 0


@dataclass(frozen=True)
class RankMemory:
    """Bytes per pipeline rank. The optimizer step runs when no activation is alive, so a rank's peak is its train
    state plus the larger of its activations and what the step adds."""

    train_state: tuple[float, ...]
    activations: tuple[float, ...]
    optimizer_step: tuple[float, ...]

    @property
    def totals(self) -> tuple[float, ...]:
        return tuple(t + max(a, s) for t, a, s in zip(self.train_state, self.activations, self.optimizer_step))


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
) -> RankMemory:
    """Train state, activations and the optimizer step's bytes per pipeline rank of this plan."""
    pp = stages.num_ranks
    train, acts, step = [], [], []
    for rank in range(pp):
        held = stages.rank_stages(rank)
        held_bytes = [
            stage_memory_bytes(
                stages.stage_layers(s),
                tp=tp,
                dp=dp,
                precision=workload.precision,
                zero_stage=zero_stage,
                lora=workload.lora,
                vocab_layers=workload.vocab_layers,
            )
            for s in held
        ]
        train.append(sum(state_bytes for state_bytes, _ in held_bytes))
        step.append(sum(step_bytes for _, step_bytes in held_bytes))
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
                gradient_copy=GRADIENT_COPY_BYTES.get(workload.precision, 0.0)
                * largest_gradient(
                    stages.stage_layers(s),
                    workload.shape,
                    tp=tp,
                    lora=workload.lora,
                    vocab_layers=workload.vocab_layers,
                ),
                first=s == 0,
                last=s == stages.num_stages - 1,
            )
            for s in held
        ]
        acts.append(
            rank_activation_bytes(workload.schedule, pp=pp, micro_batches=micro_batches, rank=rank, stages=per_stage)
        )
    return RankMemory(tuple(train), tuple(acts), tuple(step))


def step_seconds(stages: StagePlan, workload: Workload, hardware: Hardware, candidate: Candidate, m: int) -> float:
    """(m + pp - 1) slots of the slowest stage's forward and backward of one micro-batch (1F1B)."""
    recompute = 4.0 if candidate.checkpoint_interval else 3.0
    selective = candidate.selective or workload.recompute_attention
    attention = attention_flops_per_token(workload.shape, seq_len=workload.seq_len) if selective else 0.0
    tokens = candidate.micro_batch_size * workload.seq_len

    def cost(c: LayerCost) -> float:
        work = c.flops_per_token * recompute + attention if c.role == "block" else c.flops_per_token * 3.0
        return work / _split(c, candidate.tp, workload)

    slowest = max(sum(cost(c) for c in stages.stage_layers(s)) for s in range(stages.num_stages))
    return (m + candidate.pp - 1) * slowest * tokens / (hardware.tflops * 1e12 * hardware.mfu)


def attention_flops_per_token(shape: BlockShape, *, seq_len: int) -> float:
    """What selective checkpointing recomputes per token of one block: its attention module's forward (the q, k, v
    and output projections, and the scores and mixing counted as pptk.parallel.partition counts them)."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return 2.0 * (2 * h * q + 2 * h * kv) + 2.0 * seq_len * h


def candidates(hardware: Hardware, *, micro_batch_sizes: tuple[int, ...], selective: bool = True) -> list[Candidate]:
    """Every pp x tp x dp = gpus grid, micro-batch size and checkpointing choice: none, each block's attention
    (``selective``: where the blocks have an attention module) or whole blocks (ZeRO-1: the most with pp > 1)."""
    choices = [(0, False), (0, True), (1, False)] if selective else [(0, False), (1, False)]
    out = []
    for pp in _divisors(hardware.gpus):
        for tp in _divisors(hardware.gpus // pp):
            for mbs in micro_batch_sizes:
                for interval, attention in choices:
                    out.append(Candidate(pp, tp, hardware.gpus // (pp * tp), mbs, interval, selective=attention))
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
    memory = rank_memory(
        stages,
        dataclasses.replace(workload, recompute_attention=True) if c.selective else workload,
        tp=c.tp,
        dp=c.dp,
        zero_stage=c.zero_stage,
        micro_batch_size=c.micro_batch_size,
        micro_batches=m,
        checkpoint_interval=c.checkpoint_interval,
    )
    usable = hardware.memory_bytes * hardware.usable
    result = Forecast(
        c,
        micro_batches=m,
        step_seconds=step_seconds(stages, workload, hardware, c, m),
        bubble=(c.pp - 1) / (m + c.pp - 1),
        rank_bytes=memory.totals,
        rank_train_state=memory.train_state,
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
    selective: bool = True,
) -> list[Forecast]:
    """Every candidate layout's forecast: those that fit first, fastest first; then the rest, least memory first.
    ``tp_problem(tp)``: why the model cannot take this tp (family, heads), or None. ``selective``: weigh
    selective checkpointing too (the blocks have an attention module to recompute)."""
    plans: dict[int, StagePlan | str] = {}
    for pp in _divisors(hardware.gpus):
        try:
            plans[pp] = plan_stages(list(workload.costs), num_stages=pp, method="compute")
        except PptkError as error:
            plans[pp] = str(error)
    results = []
    for c in candidates(hardware, micro_batch_sizes=micro_batch_sizes, selective=selective):
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
