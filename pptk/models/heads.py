# Training tasks: which Hugging Face Auto class a task exports to, and its loss (Hugging Face's own functions).
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from transformers.loss import loss_utils

from pptk.errors import PptkError
from pptk.models.decoder_families import family_of
from pptk.models.moe import RouterLoss, RouterSums, load_balancing_loss, router_loss_of


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str  # attribute of `transformers`, e.g. "AutoModelForCausalLM"
    loss: Callable[..., Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]  # loss(config) -> loss_fn(logits, labels)


def _causal_lm_loss(
    logits: torch.Tensor | tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    *,
    vocab_size: int,
    num_items_in_batch: float | None = None,
    router: RouterLoss | None = None,
) -> torch.Tensor:
    # Hugging Face's loss: labels shifted inside, -100 ignored, mean over the micro-batch's counted tokens, or their
    # sum over num_items_in_batch (pptk.training.token_mean).
    outputs = logits if isinstance(logits, tuple) else (logits,)
    loss = loss_utils.ForCausalLMLoss(outputs[0], labels, vocab_size=vocab_size, num_items_in_batch=num_items_in_batch)
    if router is None:
        return loss
    if len(outputs) != 4:
        raise PptkError(
            f"the model has a router loss (router_aux_loss_coef={router.coef}) but its output has no router sums "
            f"({len(outputs)} tensors, expected logits, counts, probs, tokens): no layer ran a router"
        )
    # As <Family>ForCausalLM.forward: loss += coef * aux, per micro-batch (not divided by num_items_in_batch).
    aux = load_balancing_loss(RouterSums.check(*outputs[1:]), num_experts=router.num_experts)
    return loss + router.coef * aux.to(loss.device)


def _causal_lm_task_loss(config) -> Callable[..., torch.Tensor]:
    family = family_of(config.model_type)
    router = router_loss_of(config, moe=family.moe if family else None)
    return partial(_causal_lm_loss, vocab_size=config.vocab_size, router=router)


def _masked_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, vocab_size: int, num_items_in_batch: float | None = None
) -> torch.Tensor:
    return loss_utils.ForMaskedLMLoss(logits, labels, vocab_size=vocab_size, num_items_in_batch=num_items_in_batch)


def _sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, *, config) -> torch.Tensor:
    return loss_utils.ForSequenceClassificationLoss(labels, logits, config)


def _token_classification_loss(logits: torch.Tensor, labels: torch.Tensor, *, config) -> torch.Tensor:
    return loss_utils.ForTokenClassification(logits, labels, config)


TASKS: dict[str, Task] = {
    "causal-lm": Task("causal-lm", "AutoModelForCausalLM", _causal_lm_task_loss),
    "masked-lm": Task(
        "masked-lm", "AutoModelForMaskedLM", lambda config: partial(_masked_lm_loss, vocab_size=config.vocab_size)
    ),
    "sequence-classification": Task(
        "sequence-classification",
        "AutoModelForSequenceClassification",
        lambda config: partial(_sequence_classification_loss, config=config),
    ),
    "token-classification": Task(
        "token-classification",
        "AutoModelForTokenClassification",
        lambda config: partial(_token_classification_loss, config=config),
    ),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise PptkError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}") from None


# Class-name endings of Hugging Face task models (config.architectures) -> pptk task. GPT-2 names its LM
# "GPT2LMHeadModel"; *ForPreTraining (BERT's MLM + next-sentence heads) trains as masked-LM.
ARCHITECTURE_SUFFIXES = {
    "ForCausalLM": "causal-lm",
    "LMHeadModel": "causal-lm",
    "ForMaskedLM": "masked-lm",
    "ForPreTraining": "masked-lm",
    "ForSequenceClassification": "sequence-classification",
    "ForTokenClassification": "token-classification",
}


def tasks_in_architectures(config) -> list[str]:
    """The tasks named by ``config.architectures`` (what the checkpoint was saved as), in order, without repeats."""
    found = []
    for name in getattr(config, "architectures", None) or []:
        for suffix, task in ARCHITECTURE_SUFFIXES.items():
            if name.endswith(suffix) and task not in found:
                found.append(task)
    return found


def infer_task(config, requested: str | None = None, *, source: str = "the model") -> str:
    """The task to train or convert: read from ``config.architectures``; ``requested`` (--task) overrides or
    disambiguates it.

    - no --task: the one task the architectures name; else the family's only task (decoders: causal-lm); else an
      error listing the choices.
    - --task the family supports: used, also when the checkpoint's head is another task's (a head the task needs
      and the checkpoint lacks starts freshly initialised, as in Hugging Face).
    - --task the family does not support: an error naming what the config says and what would work.
    """
    from pptk.models import get_family  # pptk.models imports this module

    supported = sorted(get_family(config.model_type).tasks)
    named = tasks_in_architectures(config)
    architectures = getattr(config, "architectures", None)
    said = (
        f"config.architectures {architectures} ({', '.join(named) or 'no task head'})"
        if architectures
        else "no config.architectures"
    )
    if requested is not None:
        get_task(requested)
        if requested not in supported:
            suggestion = (
                f"drop --task to use {named[0]}"
                if len(named) == 1 and named[0] in supported
                else f"use --task {' | '.join(supported)}"
            )
            raise PptkError(
                f"--task {requested} conflicts with {source}: {said}, and {config.model_type} models "
                f"support {', '.join(supported)}; {suggestion}"
            )
        return requested
    usable = [task for task in named if task in supported]
    if len(usable) == 1:
        return usable[0]
    if not named and len(supported) == 1:
        return supported[0]
    choices = usable or supported
    raise PptkError(
        f"cannot tell the task of {source} ({config.model_type}, {said}); pass --task {' | '.join(choices)}"
    )


def hf_model_class(config, task: str) -> type[Any]:
    """The Hugging Face class that ``AutoModelFor<task>.from_config(config)`` would instantiate."""
    import transformers

    auto = getattr(transformers, get_task(task).auto_class)
    try:
        return auto._model_mapping[type(config)]
    except KeyError:
        raise PptkError(f"transformers has no {auto.__name__} class for model type {config.model_type!r}") from None


def synthetic_labels(
    task: str, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, config, generator: torch.Generator
) -> torch.Tensor:
    """Labels of the right kind for a random batch (verify and tests); padding is ignored (-100) where per-token."""
    pad = attention_mask == 0
    if task == "causal-lm":
        return input_ids.masked_fill(pad, -100)
    if task == "masked-lm":
        chosen = torch.rand(input_ids.shape, generator=generator) < 0.3
        chosen[:, 0] = True  # at least one masked token per row
        return input_ids.masked_fill(~chosen | pad, -100)
    if task == "sequence-classification":
        return torch.randint(0, config.num_labels, (input_ids.shape[0],), generator=generator)
    if task == "token-classification":
        labels = torch.randint(0, config.num_labels, input_ids.shape, generator=generator)
        return labels.masked_fill(pad, -100)
    raise PptkError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
