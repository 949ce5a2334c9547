# Selective activation checkpointing: each block's attention is recomputed in the backward, the rest is kept.
"""DeepSpeed's pipeline checkpoints whole layers (``activation_checkpoint_interval``): a checkpointed block keeps only
its input and recomputes everything. Megatron's "selective" recomputation keeps the MLP's activations and recomputes
only attention, which saves most of attention's activations (its q, k, v, scores and output) for a fraction of a
block's forward FLOPs. DeepSpeed offers no hook inside a layer, so pptk wraps each block's attention module in
``torch.utils.checkpoint`` (non-reentrant, RNG state preserved, so dropout draws the same mask when recomputed).

The attention module is found by structure: the outermost submodule of a block whose class name ends in
``Attention`` (GPT2Attention, LlamaAttention, BertAttention, ...), the same modules tensor parallelism splits.
Hooks stay outside the checkpoint: sequence parallelism's gather runs once, and its result is the checkpoint's
saved input. It replaces ``--activation-checkpoint-interval`` (the two are not combined).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pptk.errors import PptkError


def attention_modules(block: nn.Module) -> list[nn.Module]:
    """The outermost submodules of ``block`` whose class name ends in ``Attention``."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for sub in block.modules():
        if sub is block or id(sub) in inside:
            continue
        if type(sub).__name__.endswith("Attention"):
            found.append(sub)
            inside.update(id(m) for m in sub.modules())
    return found


def recompute_attention(block: nn.Module) -> None:
    """Make every attention module of a built block recompute its forward in the backward."""
    modules = attention_modules(block)
    if not modules:
        raise PptkError(f"selective checkpointing: {type(block).__name__} has no attention module to recompute")
    for module in modules:
        module.forward = _recomputed(module.forward)


def check_one_checkpointing(*, selective: bool, interval: int) -> None:
    """Selective and interval checkpointing are not combined."""
    if selective and interval:
        raise PptkError(
            "--selective-checkpointing recomputes attention inside each block; --activation-checkpoint-interval "
            f"{interval} recomputes whole blocks: choose one"
        )


def first_block_on_meta(layers) -> nn.Module:
    """The plan's first block, built on the meta device (no weights): what its attention modules are."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return next(lay for lay in layers if lay.role == "block").spec.build()


def check_recompute_attention(layers) -> None:
    """Refuse, before ranks start, blocks without an attention module to recompute."""
    block = first_block_on_meta(layers)
    if not attention_modules(block):
        raise PptkError(
            f"--selective-checkpointing: {type(block).__name__} has no attention module (a class named "
            "*Attention) to recompute; use --activation-checkpoint-interval"
        )


def _recomputed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
