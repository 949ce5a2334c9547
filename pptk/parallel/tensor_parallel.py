# How a stage's Hugging Face blocks are sharded over the grid's tensor-parallel group, Megatron-style.
"""Inside every block, the projections that fan out (GPT-2's ``c_attn``/``c_fc``; q/k/v, gate/up) are
column-parallel: each tp rank holds a slice of their output features, so a rank computes its own attention heads
and its own part of the MLP with no communication. The projections that fan back in (``c_proj``; o/down) are
row-parallel: each rank multiplies its slice of the input features, and one all-reduce sums the partial results
(Megatron's "g"); the matching all-reduce of the input gradient in backward sits in front of the column-parallel
layers ("f"). Both are DeepSpeed's own autograd functions (``ColumnParallel``/``RowParallel`` in
``deepspeed.module_inject.layers``, see pptk.deepspeed_compat). Embeddings, norms and the LM head stay replicated.

Weights keep Hugging Face's layout (``nn.Linear`` [out, in], GPT-2's ``Conv1D`` [in, out]); a sharded parameter
carries a ``ShardSpec`` saying which dimension is split, so loading reads only the rank's slice and a checker can
gather the slices back into Hugging Face's shapes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pptk.errors import PptkError
from pptk.models.decoder_families import MOE_FAMILIES

# Families whose blocks shard_stage cannot split, and why; every other registered family shards (gpt2, bert, and the
# decoders with separate q/k/v/o projections and an up/down MLP, with or without gate), each checked against
# Hugging Face at tp=2 by tests/distributed/test_tensor_parallel_dist.py.
TP_REFUSED = {
    "phi3": "its attention and MLP use fused projections (qkv_proj, gate_up_proj)",
    "glm": "its MLP uses a fused gate_up_proj",
    "glm4": "its MLP uses a fused gate_up_proj",
    "olmo2": "its q/k norms run over all heads at once, which a rank holding some heads cannot compute",
    "olmo3": "its q/k norms run over all heads at once, which a rank holding some heads cannot compute",
    "cohere": "its q/k layer norms hold one weight row per head, which pptk does not slice yet",
    "youtu": "its multi-head latent attention (q_a/q_b, kv_a/kv_b projections) has no Megatron split here",
    **dict.fromkeys(
        MOE_FAMILIES,
        "mixture of experts: its fused expert tensors are not sharded yet, and the router sums that cross "
        "stages need DeepSpeed's pipe/grad partitioning off",
    ),
}
SHARD_ATTR = "pptk_shard"
TP_MODULE_ATTR = (
    "pptk_tensor_parallel"  # an attention or MLP module shard_stage split (sequence parallelism gathers there)
)
PARTIAL_GRAD_ATTR = "pptk_partial_grad"  # a replicated parameter whose gradient is summed over tp
# DeepSpeed's mark of a tensor-parallel parameter (deepspeed.runtime.utils.is_model_parallel_parameter): gradient
# norms count it on every tp rank, and a replicated one on tp rank 0 only.
DEEPSPEED_TP_ATTR = "tensor_model_parallel"


@dataclass(frozen=True)
class ShardSpec:
    """This rank's slice of a parameter: dimension ``dim`` split into ``size`` equal parts, part ``rank``.

    ``fused`` > 1: the dimension holds several tensors side by side (GPT-2's ``c_attn`` is q | k | v); each of them
    is split, so every rank gets its own heads of q, of k and of v rather than a contiguous third.

    ``full`` > 0: the dimension's true length, which ``size`` does not divide: it is padded with zero rows to the
    next multiple of ``size`` before the split, Megatron-style (a vocabulary; pptk.parallel.vocab_parallel), and the
    padding is cut off again whenever the slices are merged, so it is never saved in Hugging Face's shapes.
    """

    dim: int
    rank: int
    size: int
    fused: int = 1
    full: int = 0

    def padded(self, length: int) -> int:
        """The split length of a dimension whose true length is ``length``."""
        return -(-length // self.size) * self.size if self.full else length

    def full_shape(self, local: tuple[int, ...]) -> tuple[int, ...]:
        shape = list(local)
        shape[self.dim] = self.full or shape[self.dim] * self.size
        return tuple(shape)

    def ranges(self, full: int) -> list[tuple[int, int]]:
        """[begin, end) of this rank's pieces along ``dim`` of the full tensor, one per part (a padded rank's piece
        ends early: the rest of its slice is padding)."""
        part = self.padded(full) // self.fused
        piece = part // self.size
        return [
            (p * part + self.rank * piece, min(p * part + (self.rank + 1) * piece, full)) for p in range(self.fused)
        ]

    def take(self, full: torch.Tensor) -> torch.Tensor:
        length = full.shape[self.dim]
        pieces = [full.narrow(self.dim, begin, max(end - begin, 0)) for begin, end in self.ranges(length)]
        taken = torch.cat(pieces, dim=self.dim)
        missing = self.padded(length) // self.size - taken.shape[self.dim]
        if missing:
            shape = list(taken.shape)
            shape[self.dim] = missing
            taken = torch.cat([taken, taken.new_zeros(shape)], dim=self.dim)
        return taken.clone()

    def merge(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's slice (``shards[r]`` from tp rank r), without any padding."""
        split = [shard.chunk(self.fused, dim=self.dim) for shard in shards]
        merged = torch.cat([split[r][p] for p in range(self.fused) for r in range(self.size)], dim=self.dim)
        return merged.narrow(self.dim, 0, self.full) if self.full else merged


def shard_spec(param: torch.Tensor) -> ShardSpec | None:
    return getattr(param, SHARD_ATTR, None)


class ShardedLinear(nn.Module):
    """A column- or row-parallel slice of an ``nn.Linear`` or GPT-2 ``Conv1D``, its weight in Hugging Face's layout.

    column: every rank sees the full input and produces its slice of the output features (bias sliced too).
    row: every rank sees its slice of the input features; the partial outputs are summed over the group, then the
    (replicated) bias is added once.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, *, kind: str, conv1d: bool, group):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.kind = kind
        self.conv1d = conv1d
        self.group = group
        # pptk.parallel.sequence_parallel.SequenceGroup under --sequence-parallel: the input arrives gathered
        # (column), the output leaves reduce-scattered over the sequence (row)
        self.sequence: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from pptk.deepspeed_compat import tensor_parallel_functions

        column, row = tensor_parallel_functions()
        weight = self.weight.t() if self.conv1d else self.weight  # Conv1D stores [in, out]
        if self.kind == "column":
            return F.linear(x if self.sequence is not None else column.apply(self.group, x), weight, self.bias)
        partial = F.linear(x, weight)
        out = (
            self.sequence.reduce_scatter(partial)
            if self.sequence is not None
            else row.apply(self.group, partial, False)
        )
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"{self.kind}-parallel, weight {tuple(self.weight.shape)}{' (Conv1D layout)' if self.conv1d else ''}"


def check_tensor_parallel(config, tp: int) -> None:
    """Refuse, before any rank starts, a model that cannot be split ``tp`` ways; the message names the fix."""
    if tp == 1:
        return
    family = config.model_type
    if family in TP_REFUSED:
        raise PptkError(
            f"--tp {tp}: {family} has no tensor-parallel support: {TP_REFUSED[family]}; train {family} with --tp 1 "
            "(pipeline and data parallelism)"
        )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    problems = []
    if heads % tp:
        problems.append(f"num_attention_heads({heads}) is not divisible by tp({tp})")
    if kv_heads < tp:
        problems.append(
            f"num_key_value_heads({kv_heads}) < tp({tp}): every tp rank needs at least one key/value head "
            "(replicating KV heads is not implemented)"
        )
    elif kv_heads % tp:
        problems.append(f"num_key_value_heads({kv_heads}) is not divisible by tp({tp})")
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    intermediate = intermediate or 4 * config.hidden_size
    if intermediate % tp:
        problems.append(f"the MLP width ({intermediate}) is not divisible by tp({tp})")
    if problems:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0 and kv_heads % d == 0 and intermediate % d == 0]
        raise PptkError(
            f"--tp {tp} cannot split {family}: " + "; ".join(problems) + f". Use --tp {' or '.join(map(str, divisors))}"
        )


def _shard(
    parent: nn.Module, name: str, *, kind: str, group, rank: int, size: int, fused: int = 1, full: int = 0
) -> None:
    """Replace ``parent.<name>`` (Linear or Conv1D) with this rank's slice, keeping the parameter names (``full``:
    see ShardSpec; a padded column-parallel layer only)."""
    layer = getattr(parent, name)
    conv1d = type(layer).__name__ == "Conv1D"
    if not conv1d and not isinstance(layer, nn.Linear):
        raise PptkError(f"cannot shard {type(parent).__name__}.{name}: {type(layer).__name__} is not Linear/Conv1D")
    out_dim = 1 if conv1d else 0  # the output features' dimension of the weight
    weight_dim = out_dim if kind == "column" else 1 - out_dim
    weight_spec = ShardSpec(dim=weight_dim, rank=rank, size=size, fused=fused, full=full)
    weight = _sharded_parameter(layer.weight, weight_spec)
    bias = None
    if layer.bias is not None:
        if kind == "column":
            bias_spec = ShardSpec(dim=0, rank=rank, size=size, fused=fused, full=full)
            bias = _sharded_parameter(layer.bias, bias_spec)
        else:
            bias = layer.bias
    setattr(parent, name, ShardedLinear(weight, bias, kind=kind, conv1d=conv1d, group=group))


def _mark_partial_gradients(module: nn.Module, *, row: object) -> None:
    """A replicated parameter inside a sharded module (a per-head norm, a learned activation) acts on this rank's
    heads or features only, so its gradient here is a part to be summed over the tp ranks (see
    sum_partial_gradients). The row-parallel bias is added after the all-reduce and already has the whole
    gradient."""
    row_bias = getattr(row, "bias", None)
    for param in module.parameters():
        if shard_spec(param) is None and param is not row_bias:
            setattr(param, PARTIAL_GRAD_ATTR, True)


def sum_partial_gradients(module: nn.Module, *, group) -> None:
    """Sum over the tp group the gradients of the parameters shard_stage marked as partial (once the parameters
    are final: a hook does not follow a parameter that is replaced)."""
    for param in module.parameters():
        if getattr(param, PARTIAL_GRAD_ATTR, False):
            param.register_hook(partial(_sum_over_tp, group=group))


def _sum_over_tp(grad: torch.Tensor, *, group) -> torch.Tensor:
    grad = grad.clone()
    torch.distributed.all_reduce(grad, group=group)
    return grad


@torch.no_grad()
def materialize_parameters(module: nn.Module) -> None:
    """Allocate (uninitialised, on the CPU) every parameter a meta-device build left empty, keeping its marks.

    With a pretrained checkpoint a rank builds its blocks' parameters on the meta device, shards them there and
    allocates only its slices here, so loading never holds a whole unsharded block (buffers are built for real)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.is_meta:
                real = nn.Parameter(torch.empty(param.shape, dtype=param.dtype), requires_grad=param.requires_grad)
                real.__dict__.update(param.__dict__)  # ShardSpec and DeepSpeed's tensor-parallel mark
                sub._parameters[name] = real


def _sharded_parameter(full: torch.Tensor, spec: ShardSpec) -> nn.Parameter:
    param = nn.Parameter(spec.take(full.detach()))
    setattr(param, SHARD_ATTR, spec)
    setattr(param, DEEPSPEED_TP_ATTR, True)
    return param


def _rank_config(config, size: int):
    """The attention module's config as this rank sees it: its share of the (key/value) heads."""
    config = copy.copy(config)
    config.num_attention_heads //= size
    if getattr(config, "num_key_value_heads", None):
        config.num_key_value_heads //= size
    return config


@torch.no_grad()
def shard_stage(module: nn.Module, *, group, rank: int, size: int) -> int:
    """Shard every attention and MLP of this stage in place; returns how many modules were sharded."""
    from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput, BertSelfAttention, BertSelfOutput
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention

    kw = dict(group=group, rank=rank, size=size)
    count = 0
    for sub in list(module.modules()):
        if isinstance(sub, GPT2Attention):
            if sub.is_cross_attention:
                raise PptkError("GPT-2 cross-attention cannot be sharded")
            _shard(sub, "c_attn", kind="column", fused=3, **kw)  # q | k | v: each rank takes its heads of each
            _shard(sub, "c_proj", kind="row", **kw)
            sub.num_heads //= size
            sub.split_size //= size
            sub.config = _rank_config(sub.config, size)
        elif isinstance(sub, GPT2MLP):
            _shard(sub, "c_fc", kind="column", **kw)
            _shard(sub, "c_proj", kind="row", **kw)
        elif isinstance(sub, BertSelfAttention):
            for name in ("query", "key", "value"):
                _shard(sub, name, kind="column", **kw)
            sub.num_attention_heads //= size
            sub.all_head_size //= size
            sub.config = _rank_config(sub.config, size)
        elif isinstance(sub, BertIntermediate):
            _shard(sub, "dense", kind="column", **kw)
        elif isinstance(sub, (BertSelfOutput, BertOutput)):
            _shard(sub, "dense", kind="row", **kw)  # then dropout and the residual LayerNorm, on the summed output
        elif all(hasattr(sub, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            for name in ("q_proj", "k_proj", "v_proj"):
                _shard(sub, name, kind="column", **kw)
            _shard(sub, "o_proj", kind="row", **kw)
            if hasattr(sub, "config"):
                sub.config = _rank_config(sub.config, size)
            _mark_partial_gradients(sub, row=sub.o_proj)  # per-head q/k norms (Qwen3, Gemma 3)
        elif hasattr(sub, "up_proj") and hasattr(sub, "down_proj"):  # gated (SwiGLU) or not (Arcee, Apertus)
            for name in ("gate_proj", "up_proj"):
                if hasattr(sub, name):
                    _shard(sub, name, kind="column", **kw)
            _shard(sub, "down_proj", kind="row", **kw)
            _mark_partial_gradients(sub, row=sub.down_proj)  # a learned activation (Apertus' xIELU)
        elif isinstance(getattr(sub, "c_fc", None), nn.Linear) and isinstance(getattr(sub, "c_proj", None), nn.Linear):
            _shard(sub, "c_fc", kind="column", **kw)  # StarCoder2's MLP: GPT-2's names on nn.Linear
            _shard(sub, "c_proj", kind="row", **kw)
        else:
            continue
        setattr(sub, TP_MODULE_ATTR, True)
        count += 1
    return count


@torch.no_grad()
def gather_full(tensor: torch.Tensor, spec: ShardSpec | None, *, group) -> torch.Tensor:
    """The full Hugging Face tensor from every tp rank's slice of it (every rank gets it); ``spec`` None: the
    tensor is replicated and returned as is."""
    if spec is None:
        return tensor.detach().clone()
    shards = [torch.empty_like(tensor) for _ in range(spec.size)]
    torch.distributed.all_gather(shards, tensor.detach().contiguous(), group=group)
    return spec.merge(shards)


@torch.no_grad()
def load_sliced_state(layer: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy a full (unsharded) layer state into this rank's layer, each sharded tensor cut to the rank's slice."""
    specs = {name: shard_spec(p) for name, p in layer.named_parameters()}
    own = layer.state_dict()
    if set(own) != set(full):
        raise PptkError(f"layer file keys {sorted(set(full) ^ set(own))[:5]} do not match the model's layer")
    for name, target in own.items():
        spec = specs.get(name)
        target.copy_(spec.take(full[name]) if spec is not None else full[name])


def rank_slice(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full tensor belonging to ``param`` (the tensor itself where ``param`` is replicated)."""
    spec = shard_spec(param)
    return spec.take(full) if spec is not None else full
