# DPO's loss as TRL defines it, computed on the last pipeline stage from the logits and what the labels carry.
"""A DPO micro-batch holds whole pairs, rows interleaved: row 2i is pair i's prompt + chosen answer, row 2i+1 its
prompt + rejected answer. DeepSpeed hands the last stage ``loss_fn(logits, labels)``; the labels are a tuple
``(targets, reference_logps, pair_index)``:

- ``targets`` int64 [rows, seq]: the token ids on the answer tokens, -100 elsewhere (SFT's labels of the answer);
- ``reference_logps`` float32 [rows]: the reference model's summed answer log-probabilities (pptk.tasks.dpo_reference);
- ``pair_index`` int64 [rows]: which pair a row belongs to, -1 for a filler pair that only completes a micro-batch.

The formulas are TRL's ``DPOTrainer.dpo_loss`` with ``logits = (pi_c - pi_r) - (ref_c - ref_r)``:
``sigmoid`` -logsigmoid(beta * logits), ``hinge`` relu(1 - beta * logits), ``ipo`` (logits - 1 / (2 beta))^2 with
the log-probabilities averaged over the answer tokens (TRL does that for ipo only); rewards are
beta * (pi - ref), accuracy is rewards/chosen > rewards/rejected. The micro-batch loss is the mean over its real
pairs; every micro-batch of a step has as many pairs, so DeepSpeed's mean over micro-batches and replicas is the
mean over the step's pairs, as TRL's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pptk.errors import PptkError

IGNORE = -100
LOSS_TYPES = ("sigmoid", "ipo", "hinge")
# TRL's metric names; each is a mean over pairs
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def check_loss_settings(*, beta: float, loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise PptkError(f"unknown DPO loss type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise PptkError(f"--beta must be positive (TRL's default is 0.1), got {beta}")


def answer_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of the answer tokens (float32) and their count; logits at position t
    predict the token at t + 1, as in Hugging Face's causal-LM loss."""
    logits = logits[:, :-1].float()
    targets = targets[:, 1:]
    counted = targets != IGNORE
    picked = torch.gather(logits, -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(logits, dim=-1)
    return (token_logps * counted).sum(-1), counted.sum(-1)


def dpo_terms(
    policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, *, beta: float, loss_type: str
) -> dict[str, torch.Tensor]:
    """Per pair: ``losses`` and TRL's metrics, from per-row summed log-probabilities [2 * pairs] (chosen, rejected
    interleaved) of the policy and the reference, and per-row answer-token counts."""
    policy, reference = policy.double(), reference.double()
    if loss_type == "ipo":  # TRL averages the log-probabilities over the answer tokens for ipo
        policy, reference = policy / counts.clamp(min=1), reference / counts.clamp(min=1)
    pi_c, pi_r, ref_c, ref_r = policy[0::2], policy[1::2], reference[0::2], reference[1::2]
    logits = (pi_c - pi_r) - (ref_c - ref_r)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen, rejected = beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()
    return {
        "losses": losses,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).double(),
        "rewards/margins": chosen - rejected,
        "logps/chosen": pi_c.detach(),
        "logps/rejected": pi_r.detach(),
    }


@dataclass
class DpoLoss:
    """The last stage's ``loss_fn``. ``collect_logps`` switches it to a forward-only pass that keeps, per pair,
    (pair index, summed chosen log-prob, summed rejected log-prob) in ``collected`` and returns 0 (the reference pass
    and evaluation); training steps add their pairs' metrics to ``window`` (sums and a count, since the last read)."""

    beta: float
    loss_type: str
    collect_logps: bool = False
    collected: list[torch.Tensor] = field(default_factory=list)
    window: dict[str, float] = field(default_factory=dict)

    def __call__(self, outputs: torch.Tensor | tuple[torch.Tensor, ...], labels: tuple[torch.Tensor, ...]):
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        targets, reference, index = labels
        policy, counts = answer_logps(logits, targets)
        if self.collect_logps:  # kept here, on the loss stage: DeepSpeed's loss bookkeeping wants a scalar
            self.collected.append(
                torch.stack([index[0::2].double(), policy[0::2].double(), policy[1::2].double()], dim=1).detach()
            )
            return torch.zeros((), dtype=torch.float32, device=logits.device)
        terms = dpo_terms(policy, reference, counts, beta=self.beta, loss_type=self.loss_type)
        real = index[0::2] >= 0
        if torch.is_grad_enabled():
            for name in METRICS:
                self.window[name] = self.window.get(name, 0.0) + float(terms[name][real].sum())
            self.window["count"] = self.window.get("count", 0.0) + float(real.sum())
        return terms["losses"][real].mean().float()

    def take_window(self) -> dict[str, float]:
        window, self.window = self.window, {}
        return window
