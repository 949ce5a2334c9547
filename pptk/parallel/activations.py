# Activation memory per pipeline rank: what a micro-batch keeps for backward, times the micro-batches in flight.
"""The bytes a layer saves for backward, per token, follow the layer's shapes (Korthikanti et al., "Reducing
Activation Recomputation in Large Transformer Models", 2022, count them for Megatron's block). pptk's blocks are
Hugging Face's own modules, which keep a different set, so the counts below were taken from the real modules:
every tensor autograd saves in one block's forward, seen through ``torch.autograd.graph.saved_tensors_hooks`` on
CPU (tests/unit/test_activations.py checks them to 2% against LLaMA- and GPT-2-shaped blocks in fp32 and bf16).

Two block templates cover what was measured:
- ``rms_swiglu`` (LLaMA and the families built like it): RMSNorm upcasts its input to fp32, rotary cos/sin,
  SDPA whose fused CPU kernel keeps no [heads, s, s] scores (attention dropout 0), a gated MLP (gate, up, act,
  product);
- ``gpt2``: LayerNorm, eager attention upcast to fp32 that keeps three [heads, s, s] tensors (scores, dropout
  noise, dropped scores), gelu_new's five [s, intermediate] tensors, dropout noise in the activations' dtype.
Other families are forecast with ``rms_swiglu`` (modelled, not measured). On GPUs flash attention keeps no scores
either and dropout keeps 1-byte masks, so the CPU counts are an upper bound there (not measured: no GPU here).

A pipeline rank holds one such set per micro-batch in flight: the number of forwards its schedule has run whose
backward has not run yet, replayed from DeepSpeed's own schedule (1F1B: stage i of pp holds min(pp - i, m)).
With activation checkpointing DeepSpeed cuts each stage's local layers into runs of ``interval`` from its first
layer and checkpoints a run only when every layer in it is a block; a checkpointed run keeps its input alone, and
the backward recomputes one run at a time, which holds that run's full set once. On top of the kept sets, a
backward holds gradients (``BACKWARD_BLOCKS``) and the loss its logits (``head_bytes_per_token``), or, right
after a backward with one micro-batch fewer in flight, the optimizer's copy of a gradient.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

FP32 = 4
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class BlockShape:
    """What a block's saved activations depend on (from the Hugging Face config)."""

    template: str  # "rms_swiglu" | "gpt2"
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


def block_shape(config) -> BlockShape:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    template = "gpt2" if config.model_type == "gpt2" else "rms_swiglu"
    return BlockShape(template, hidden, heads, kv_heads, head_dim, intermediate, config.vocab_size)


def block_bytes_per_token(
    shape: BlockShape, *, seq_len: int, precision: str, tp: int = 1, sequence_parallel: bool = False
) -> float:
    """Bytes one block saves for backward per token of a micro-batch, on one tp rank (heads and MLP columns split
    tp ways; the norms and the residual stream replicated, or split tp ways under sequence parallelism, where the
    two gathered inputs of the attention and the MLP, and the rotary tables, stay whole: modelled, not measured)."""
    p = PRECISION_BYTES[precision]
    h, kv, d, i, a = shape.hidden, shape.kv_heads * shape.head_dim, shape.head_dim, shape.intermediate, shape.heads
    if shape.template == "gpt2":
        # LayerNorm input and output, the residual and MLP dropout noise, the second norm's input, c_fc's input;
        # q, k, v (fp32), three [a, s, s] fp32 score tensors, c_proj's input, gelu_new's five [s, i] tensors
        replicated = p * (6 * h + 4)
        gathered = p * 2 * h  # c_attn's and c_fc's inputs
        split = FP32 * (a * d + 2 * kv + 3 * a * seq_len) + p * (a * d + 5 * i)
    else:
        # two RMSNorms: fp32 input + rsqrt, normalised and weighted outputs; rotary cos/sin; q (as SDPA's output),
        # k, v, the o_proj input, SDPA's log-sum-exp (fp32); gate, up, act(gate) and their product
        replicated = FP32 * (2 * h + 2) + p * (4 * h + 2 * d)
        gathered = p * (2 * h + 2 * d)  # the attention's and the MLP's inputs, the rotary cos/sin
        split = p * (2 * a * d + 2 * kv + 4 * i) + FP32 * a
    if sequence_parallel:
        return (replicated - gathered) / tp + gathered + split / tp
    return replicated + split / tp


def attention_bytes_per_token(shape: BlockShape, *, seq_len: int, precision: str, tp: int = 1) -> float:
    """What a block's attention module saves for backward per token, on one tp rank: what selective checkpointing
    (pptk.parallel.recompute) frees. Counted like the blocks (tests/unit/test_activations.py): its input and, for
    the rms_swiglu template, the rotary cos/sin besides q, k, v, the output projection's input and the log-sum-exp
    (``gpt2``: the fp32 q, k, v and three [a, s, s] score tensors)."""
    p = PRECISION_BYTES[precision]
    h, kv, d, a = shape.hidden, shape.kv_heads * shape.head_dim, shape.head_dim, shape.heads
    if shape.template == "gpt2":
        return p * h + (FP32 * (a * d + 2 * kv + 3 * a * seq_len) + p * a * d) / tp
    return p * (h + 2 * d) + (p * (2 * a * d + 2 * kv) + FP32 * a) / tp


def head_bytes_per_token(shape: BlockShape, *, precision: str, tp_vocab: int = 1) -> tuple[float, float]:
    """(saved, transient) bytes per token of the final norm, LM head and cross-entropy: the loss keeps the fp32
    log-softmax [s, vocab]; while it runs, the logits, their fp32 copy (bf16 and fp16) and the log-softmax's
    output or gradient exist at once. ``tp_vocab``: the vocabulary is split that many ways
    (pptk.parallel.vocab_parallel), each rank holding its slice of the logits."""
    p = PRECISION_BYTES[precision]
    norm = FP32 * (shape.hidden + 1) + p * 2 * shape.hidden
    vocab = shape.vocab / tp_vocab
    fp32_copy = FP32 if p < FP32 else 0  # fp32 logits are not copied
    return norm + FP32 * vocab, (FP32 + p + fp32_copy) * vocab


# A block's backward holds the gradients of its saved tensors while they are still alive: the measured peaks on
# CPU ranks (benchmarks/plan_memory.py, with and without checkpointing) sit two blocks' saved sets above the kept
# micro-batches, a recomputed run's set included.
BACKWARD_BLOCKS = 2.0


@dataclass(frozen=True)
class StageActivations:
    """One pipeline stage's activation bytes for one micro-batch."""

    kept: float  # held from its forward to its backward
    transient: float  # the most held at once on top of ``kept`` by one backward (recompute, gradients) or the loss


def stage_activations(
    roles: list[str],
    shape: BlockShape,
    *,
    micro_batch_size: int,
    seq_len: int,
    precision: str,
    tp: int = 1,
    vocab_split: bool = False,
    sequence_parallel: bool = False,
    checkpoint_interval: int = 0,
    recompute_attention: bool = False,
    gradient_copy: float = 0.0,
    first: bool,
    last: bool,
) -> StageActivations:
    """``roles``: the stage's local layers in order ("embed" | "block" | "head"), as DeepSpeed sees them.
    ``gradient_copy``: bytes the optimizer copies a gradient into after each backward (pptk.parallel.advisor), when
    that micro-batch's activations are gone."""
    tokens = micro_batch_size * seq_len
    # under sequence parallelism the hidden states between blocks (and so the pipe buffers) hold S / tp positions
    hidden_bytes = tokens * PRECISION_BYTES[precision] * shape.hidden / (tp if sequence_parallel else 1)
    whole_block = tokens * block_bytes_per_token(
        shape, seq_len=seq_len, precision=precision, tp=tp, sequence_parallel=sequence_parallel
    )
    # selective checkpointing: a block keeps all but its attention's set, and its backward recomputes that set once
    attention = tokens * attention_bytes_per_token(shape, seq_len=seq_len, precision=precision, tp=tp)
    block = whole_block - attention if recompute_attention else whole_block
    head_saved, head_transient = head_bytes_per_token(shape, precision=precision, tp_vocab=tp if vocab_split else 1)
    full = {"embed": 0.0, "block": block, "head": 0.0}
    # the stage's received input and sent output stay in DeepSpeed's pipe buffers until the backward
    kept = hidden_bytes * float((not first) + (not last))
    recompute = 0.0
    step = checkpoint_interval or len(roles)
    for start in range(0, len(roles), step):
        run = roles[start : start + step]
        run_bytes = sum(full[role] for role in run)
        if checkpoint_interval and all(role == "block" for role in run):
            kept += hidden_bytes
            recompute = max(recompute, run_bytes)
        else:
            kept += run_bytes
    if last and "head" in roles:
        kept += tokens * head_saved
    if recompute_attention:
        recompute = max(recompute, attention)
    backward = recompute + BACKWARD_BLOCKS * whole_block if "block" in roles else 0.0
    transient = max(backward, tokens * head_transient if last and "head" in roles else 0.0, gradient_copy - kept)
    return StageActivations(kept, transient)


@functools.lru_cache(maxsize=256)
def in_flight_profile(schedule: str, *, pp: int, micro_batches: int, rank: int) -> tuple[tuple[int, ...], ...]:
    """Micro-batches whose forward has run and backward has not, per stage of this pipeline rank (one stage under
    1F1B, two under DualPipeV: (rank, 2pp-1-rank)), after each compute instruction of DeepSpeed's schedule."""
    from pptk.deepspeed_compat import schedule_instructions

    dual = schedule == "dualpipev"
    program = schedule_instructions(dualpipev=dual, micro_batches=micro_batches, stages=pp, stage_id=rank)
    held = [0, 0] if dual else [0]
    profile = []
    for name, kwargs in program:
        if name in ("ForwardPass", "BackwardPass"):
            phase = kwargs.get("phase", 0) if dual else 0
            held[phase] += 1 if name == "ForwardPass" else -1
            profile.append(tuple(held))
    return tuple(profile)


def rank_activation_bytes(
    schedule: str, *, pp: int, micro_batches: int, rank: int, stages: list[StageActivations]
) -> float:
    """Peak activation bytes of a pipeline rank: the worst point of its schedule, the kept sets of every
    micro-batch in flight plus one transient. ``stages``: this rank's stages in order (1, or 2 under DualPipeV)."""
    if schedule != "dualpipev":  # closed form, so the advisor need not replay DeepSpeed's schedule per layout
        return min(pp - rank, micro_batches) * stages[0].kept + stages[0].transient
    profile = in_flight_profile(schedule, pp=pp, micro_batches=micro_batches, rank=rank)
    peak = max(sum(n * s.kept for n, s in zip(counts, stages)) for counts in profile)
    return peak + max(s.transient for s in stages)
