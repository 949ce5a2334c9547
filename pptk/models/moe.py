# Mixture-of-experts on the pipeline: the router load-balancing loss as per-stage partial sums that travel to the loss.
"""Hugging Face's ``load_balancing_loss_func`` (Switch Transformer, transformers 5.23: Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, ...) pools over *all* MoE layers of the model, then multiplies::

    aux = E * sum_e (count_e / T) * (prob_e / T)

    count_e: top-k assignments to expert e, summed over layers and real (unpadded) tokens
    prob_e:  softmax router probability of expert e, summed the same way
    T:       real tokens x MoE layers

A product of pooled means is not a sum of per-stage terms, so no stage can add its own share. Instead each block adds
its layer's three partial sums to ``RouterSums``, which cross stage boundaries with the stage protocol
(pptk.models.protocol): ``counts`` and ``tokens`` as int64 (no gradient, exact), ``probs`` as fp32 (its gradient
flows back to every stage's routers). The loss (pptk.models.heads) takes the product once, on the last stage, and
adds ``router_aux_loss_coef * aux`` as ``<Family>ForCausalLM.forward`` does.

Transformers records router logits with hooks installed only inside ``<Family>Model.forward``
(``_can_record_outputs["router_logits"]``): a decoder layer called alone records nothing. ``RouterCapture`` hooks
the same router class for the length of one block call and writes into a local of that call; the sums are outputs
of the block, so a recomputation under activation checkpointing replaces them rather than counting twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pptk.errors import PptkError


@dataclass(frozen=True)
class RouterLoss:
    """What the loss needs, read once from the config (``output_router_logits``, ``router_aux_loss_coef``)."""

    num_experts: int
    top_k: int
    coef: float


@dataclass(frozen=True)
class RouterSums:
    """Per-stage partial sums of the load-balancing loss (see the module docstring)."""

    counts: torch.Tensor  # int64 [E]: top-k assignments of real tokens
    probs: torch.Tensor  # fp32 [E]: router probabilities of real tokens (carries the gradient)
    tokens: torch.Tensor  # int64 [1]: real tokens x MoE layers so far

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.counts.contiguous(), self.probs.contiguous(), self.tokens.contiguous())

    @classmethod
    def check(cls, counts: torch.Tensor, probs: torch.Tensor, tokens: torch.Tensor) -> RouterSums:
        experts = counts.shape[0] if counts.dim() == 1 else -1
        if counts.dtype != torch.long or experts < 1:
            raise TypeError(
                f"stage protocol: router counts must be int64 [experts], got {counts.dtype} {list(counts.shape)}"
            )
        if probs.dtype != torch.float32 or tuple(probs.shape) != (experts,):
            raise TypeError(
                f"stage protocol: router probs must be fp32 [{experts}], got {probs.dtype} {list(probs.shape)}"
            )
        if tokens.dtype != torch.long or tuple(tokens.shape) != (1,):
            raise TypeError(f"stage protocol: router tokens must be int64 [1], got {tokens.dtype} {list(tokens.shape)}")
        return cls(counts, probs, tokens)

    def __add__(self, other: RouterSums) -> RouterSums:
        return RouterSums(self.counts + other.counts, self.probs + other.probs, self.tokens + other.tokens)


def layer_sums(router_logits: torch.Tensor, attention_mask: torch.Tensor, *, top_k: int) -> RouterSums:
    """One layer's share, computed as ``load_balancing_loss_func`` does it (softmax in the logits' dtype, then fp32
    sums), with padding tokens left out through the 2-D attention mask."""
    num_experts = router_logits.shape[-1]
    weights = torch.softmax(router_logits, dim=-1)
    _, selected = torch.topk(weights, top_k, dim=-1)
    real = attention_mask.reshape(-1).to(router_logits.device)
    counts = torch.zeros(num_experts, dtype=torch.long, device=real.device)
    counts.scatter_add_(0, selected.reshape(-1), real.long().repeat_interleave(top_k))
    probs = (weights.float() * real.float().unsqueeze(-1)).sum(dim=0)
    return RouterSums(counts, probs, real.long().sum().reshape(1))


def load_balancing_loss(sums: RouterSums, *, num_experts: int) -> torch.Tensor:
    """E * sum((counts / T) * (probs / T)): Hugging Face's product of pooled means, taken once over every layer."""
    total = sums.tokens.float()
    return torch.sum((sums.counts.float() / total) * (sums.probs / total)) * num_experts


def router_loss_of(config, *, moe: str | None) -> RouterLoss | None:
    """The aux-loss settings when Hugging Face adds the term for this config, else None.

    moe: the family's kind (pptk.models.decoder_families.Family.moe): "switch" adds HF's load-balancing loss when
    ``output_router_logits`` is set, "none" never does (DeepSeek-V3), None is a dense family.
    """
    if moe != "switch" or not getattr(config, "output_router_logits", False):
        return None
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    coef = getattr(config, "router_aux_loss_coef", None)
    if not num_experts or coef is None:
        raise PptkError(
            f"{config.model_type} config: output_router_logits is set but num_experts={num_experts!r}, "
            f"router_aux_loss_coef={coef!r}; set both, or output_router_logits=false"
        )
    return RouterLoss(num_experts=int(num_experts), top_k=int(config.num_experts_per_tok), coef=float(coef))


EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")  # the families' names for it


def experts_of(config) -> tuple[int, int] | None:
    """(top_k, routed experts) of a mixture-of-experts config, whatever the family calls them; None when dense."""
    num_experts = next((getattr(config, f, None) for f in EXPERT_COUNT_FIELDS if getattr(config, f, None)), None)
    top_k = getattr(config, "num_experts_per_tok", None)
    return (int(top_k), int(num_experts)) if num_experts and top_k else None


class RouterCapture:
    """Reads the router logits of one block call: the routers are the modules of the class Hugging Face records
    (``_can_record_outputs["router_logits"]``), their logits output ``index``."""

    def __init__(self, router_class: type[nn.Module], index: int, *, top_k: int):
        self.router_class = router_class
        self.index = index
        self.top_k = top_k

    def routers(self, block: nn.Module) -> list[nn.Module]:
        return [m for m in block.modules() if isinstance(m, self.router_class)]

    @contextmanager
    def logits(self, block: nn.Module) -> Iterator[list[torch.Tensor]]:
        """Yields a list that holds, after the block ran, each router's logits of that call (in call order)."""
        captured: list[torch.Tensor] = []  # this call's own list: nothing outlives the call

        def record(_module, _inputs, output):
            captured.append(output[self.index])

        handles = [router.register_forward_hook(record) for router in self.routers(block)]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def __repr__(self) -> str:  # shown in DeepSpeed's LayerSpec descriptions
        return f"RouterCapture({self.router_class.__name__}, top_k={self.top_k})"


def router_capture(causal_lm_class: type, *, top_k: int) -> RouterCapture:
    recorders = getattr(causal_lm_class, "_can_record_outputs", None) or {}
    recorder = recorders.get("router_logits")
    target = getattr(recorder, "target_class", None)
    if target is None:
        raise PptkError(
            f"{causal_lm_class.__name__} records no router logits (_can_record_outputs['router_logits']); "
            "pptk cannot compute its router loss"
        )
    return RouterCapture(target, int(getattr(recorder, "index", 0)), top_k=top_k)
