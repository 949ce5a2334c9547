# Megatron's sequence parallelism at tp > 1: the regions outside attention and MLP hold S/tp of the sequence.
"""With ``--sequence-parallel`` the hidden states between blocks, and so the norms, residual adds and dropout, hold
``S / tp`` positions per tp rank instead of all ``S`` on every rank (Korthikanti et al., 2022):

- a block that receives the whole sequence (the first block after the embedding) keeps its rank's chunk, and the
  backward all-gathers the chunks' gradients, so the embedding gets the whole gradient on every rank;
- the attention and MLP modules all-gather the sequence in front of their column-parallel projections (the
  backward reduce-scatters), replacing Megatron's "f", and their row-parallel projections reduce-scatter instead of
  all-reducing (the backward all-gathers): the same bytes on the wire as plain tensor parallelism;
- the LM head gathers the final norm's chunks in front of its vocabulary slice; the loss sees whole rows.

Weights that act on a chunk (norms, the row-parallel biases added after the reduce-scatter, anything else
replicated in a block or the final norm) get a part of their gradient on each rank: it is summed over the tp ranks.
The pipeline sends ``[batch, S / tp, hidden]`` between stages; the masks and position ids keep the whole sequence.

GPT-2 and the decoder families with tensor parallelism take it (``SEQUENCE_PARALLEL_FAMILIES``; not BERT, whose
heads keep whole logits), and only with the vocabulary split (its head is the gather point). Dropout in the
chunked regions draws the same stream on every tp rank (pptk seeds the tp ranks of a stage alike); Megatron forks
the RNG there. The parity checks run without dropout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pptk.errors import PptkError
from pptk.models.common import FinalNormPipe, LMHeadPipe
from pptk.models.decoder_families import FAMILIES
from pptk.parallel.tensor_parallel import PARTIAL_GRAD_ATTR, TP_MODULE_ATTR, TP_REFUSED, ShardedLinear, shard_spec

# GPT-2 and every decoder family tensor parallelism takes: each checked against Hugging Face with it at pp=2 x tp=2
# in fp32 and bf16 by hand (`pptk verify NAME --pp 2 --tp 2 --sequence-parallel`); the suite runs GPT-2, LLaMA,
# Mistral and Qwen3 (tests/distributed/test_tensor_parallel_dist.py)
SEQUENCE_PARALLEL_FAMILIES = ("gpt2", *(name for name in FAMILIES if name not in TP_REFUSED))


def _reduce_scatter(tensor: torch.Tensor, group, rank: int, size: int) -> torch.Tensor:
    """This rank's chunk (dim 1) of the sum over the group. gloo has no reduce-scatter: an all-reduce, then the
    chunk (the same result, more traffic); NCCL reduce-scatters."""
    if dist.get_backend(group) == "nccl":
        parts = tensor.movedim(1, 0).contiguous()
        out = parts.new_empty((parts.shape[0] // size, *parts.shape[1:]))
        dist.reduce_scatter_tensor(out, parts, group=group)
        return out.movedim(0, 1).contiguous()
    summed = tensor.contiguous().clone()
    dist.all_reduce(summed, group=group)
    return summed.chunk(size, dim=1)[rank].contiguous()


def _all_gather(tensor: torch.Tensor, group, size: int) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=1)


class _Gather(torch.autograd.Function):
    """forward: the whole sequence from the ranks' chunks; backward: this rank's chunk of the summed gradient."""

    @staticmethod
    def forward(ctx, tensor, group, rank: int, size: int):
        ctx.group, ctx.rank, ctx.size = group, rank, size
        return _all_gather(tensor, group, size)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.rank, ctx.size), None, None, None


class _ReduceScatter(torch.autograd.Function):
    """forward: this rank's chunk of the sum over the ranks; backward: the whole gradient from the chunks."""

    @staticmethod
    def forward(ctx, tensor, group, rank: int, size: int):
        ctx.group, ctx.size = group, size
        return _reduce_scatter(tensor, group, rank, size)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.size), None, None, None


class _Scatter(torch.autograd.Function):
    """forward: this rank's chunk of a tensor every rank holds whole; backward: the whole gradient."""

    @staticmethod
    def forward(ctx, tensor, group, rank: int, size: int):
        ctx.group, ctx.size = group, size
        return tensor.chunk(size, dim=1)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.size), None, None, None


class SequenceGroup:
    """The tp group a stage chunks its sequence over."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return _Gather.apply(tensor, self.group, self.rank, self.size)

    def reduce_scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        return _ReduceScatter.apply(tensor, self.group, self.rank, self.size)

    def scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.shape[1] % self.size:
            raise PptkError(
                f"--sequence-parallel: a micro-batch of {tensor.shape[1]} positions does not split over tp="
                f"{self.size}; use a --seq-len that tp divides"
            )
        return _Scatter.apply(tensor, self.group, self.rank, self.size)


def sequence_parallel_problem(model_type: str, *, tp: int, vocab_split: bool, task: str) -> str | None:
    """Why this model cannot run with --sequence-parallel, or None."""
    if tp == 1:
        return "it needs --tp > 1 (the sequence is split over the tensor-parallel ranks)"
    if model_type not in SEQUENCE_PARALLEL_FAMILIES:
        return f"{model_type} does not take it (GPT-2 and the decoder families that take --tp > 1 do; `pptk models`)"
    if not vocab_split:
        return f"the LM head must be split by vocabulary (a causal-lm task without --no-vocab-parallel; got {task})"
    return None


def check_sequence_lengths(*, seq_len: int, tp: int, dynamic_shape: bool = False) -> None:
    """Refuse, before ranks start, micro-batches that cannot be cut into tp equal chunks."""
    if dynamic_shape:
        raise PptkError(
            "--sequence-parallel needs micro-batches of one length that tp divides; this task's micro-batches "
            "change length (drop --sequence-parallel)"
        )
    if seq_len % tp:
        raise PptkError(f"--sequence-parallel: --seq-len {seq_len} does not split over tp={tp}; use a multiple")


def _gather_first_input(sequence: SequenceGroup):
    def hook(module, args, kwargs):
        if args:
            return (sequence.gather(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": sequence.gather(kwargs["hidden_states"])}

    return hook


def _scatter_whole_input(sequence: SequenceGroup):
    """A block's input: the whole sequence after the embedding (then it is chunked here), or a chunk already."""

    def hook(module, args):
        (inputs,) = args
        hidden, mask = inputs[0], inputs[1]
        if hidden.shape[1] != mask.shape[1]:
            return None
        return ((sequence.scatter(hidden), *inputs[1:]),)

    return hook


def _gather_head_input(sequence: SequenceGroup):
    def hook(module, args):
        (inputs,) = args
        return ((sequence.gather(inputs[0]), *inputs[1:]),)

    return hook


def apply_sequence_parallel(layer: nn.Module, *, role: str, sequence: SequenceGroup) -> None:
    """Make a built, sharded layer run on sequence chunks (see the module docstring); nothing for an embedding."""
    vocab_shard = getattr(layer, "vocab_shard", None)
    if vocab_shard is not None:  # a tied LM head (or its embedding): its logits gather
        vocab_shard.sequence = sequence
    if role == "embed":
        return
    if role == "block":
        layer.register_forward_pre_hook(_scatter_whole_input(sequence))
        for sub in layer.modules():
            if getattr(sub, TP_MODULE_ATTR, False):  # an attention or MLP module shard_stage split
                sub.register_forward_pre_hook(_gather_first_input(sequence), with_kwargs=True)
            if isinstance(sub, ShardedLinear):  # no "f" (the module gathers), a reduce-scatter for "g"
                sub.sequence = sequence
    elif isinstance(layer, LMHeadPipe):
        layer.register_forward_pre_hook(_gather_head_input(sequence))
        head = layer.lm_head
        assert isinstance(head, ShardedLinear), "the vocabulary split cuts the LM head before this"
        head.sequence = sequence
    elif not isinstance(layer, FinalNormPipe):
        return
    for param in layer.parameters():  # they see this rank's chunk: their gradient is a part
        if shard_spec(param) is None:
            setattr(param, PARTIAL_GRAD_ATTR, True)
