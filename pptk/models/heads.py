# Training tasks: which Hugging Face Auto class a task exports to, its loss, and the decoders' classification head.
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss import loss_utils

from pptk.errors import PptkError
from pptk.models.decoder_families import family_of
from pptk.models.moe import RouterLoss, RouterSums, load_balancing_loss, router_loss_of
from pptk.models.protocol import StageTensors


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
    vocab: Any = None,
) -> torch.Tensor:
    # Hugging Face's loss: labels shifted inside, -100 ignored, mean over the micro-batch's counted tokens, or their
    # sum over num_items_in_batch (pptk.training.token_mean).
    # vocab (pptk.parallel.vocab_parallel.VocabSplit): the logits are this tp rank's vocabulary slice.
    outputs = logits if isinstance(logits, tuple) else (logits,)
    if vocab is None:
        loss = loss_utils.ForCausalLMLoss(
            outputs[0], labels, vocab_size=vocab_size, num_items_in_batch=num_items_in_batch
        )
    else:
        loss = vocab.causal_lm_loss(outputs[0], labels, num_items_in_batch=num_items_in_batch)
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


def _causal_lm_task_loss(config, vocab: Any = None) -> Callable[..., torch.Tensor]:
    family = family_of(config.model_type)
    router = router_loss_of(config, moe=family.moe if family else None)
    return partial(_causal_lm_loss, vocab_size=config.vocab_size, router=router, vocab=vocab)


def _masked_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, vocab_size: int, num_items_in_batch: float | None = None
) -> torch.Tensor:
    return loss_utils.ForMaskedLMLoss(logits, labels, vocab_size=vocab_size, num_items_in_batch=num_items_in_batch)


def _sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, *, config) -> torch.Tensor:
    return loss_utils.ForSequenceClassificationLoss(labels, logits, config)


CHOSEN, REJECTED = 1, 0  # reward labels: rows alternate chosen, rejected (filler rows of an evaluation: -100)


def bradley_terry_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRL's RewardTrainer loss, -logsigmoid(r_chosen - r_rejected) averaged over the micro-batch's pairs.

    ``logits`` [rows, 1] are the rewards; ``labels`` mark each row chosen or rejected, a pair's two rows in order.
    Computed in fp32 (TRL keeps the model's dtype; the difference is one rounding of the rewards in bf16).
    """
    rewards = logits.float().reshape(len(labels), -1)[:, 0]
    chosen, rejected = rewards[labels == CHOSEN], rewards[labels == REJECTED]
    if len(chosen) != len(rejected):
        raise PptkError(
            f"a reward micro-batch holds {len(chosen)} chosen and {len(rejected)} rejected rows; each pair must "
            "travel whole (chosen, rejected) in one micro-batch"
        )
    if not len(chosen):  # only filler rows: no pair to score
        return rewards.sum() * 0.0
    return -F.logsigmoid(chosen - rejected).mean()


class ScoreHeadPipe(nn.Linear):
    """The ``score`` head of a decoder's ``*ForSequenceClassification`` (no bias), pooled as Hugging Face pools it.

    Hugging Face scores every position, then keeps each row's rightmost token that is not ``config.pad_token_id``.
    The last stage has no input ids, so the rightmost position with ``attention_mask`` 1 stands for it: the same
    token whenever padding holds the pad id and no example ends with it, which the classification and reward tasks
    check before training (pptk.tasks.classification, pptk.tasks.reward) and verify's batch guarantees.
    """

    def __init__(self, hidden_size: int, num_labels: int):
        super().__init__(hidden_size, num_labels, bias=False)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:  # type: ignore[override]
        stage = StageTensors.from_tuple(inputs)
        logits = super().forward(stage.hidden_states)
        mask = stage.attention_mask.to(torch.int32)
        last = (torch.arange(mask.shape[-1], device=mask.device, dtype=torch.int32) * mask).argmax(-1)
        return logits[torch.arange(len(logits), device=logits.device), last]


SCORED_LAST_TOKEN = ("sequence-classification", "reward")  # tasks whose decoder head pools the last token


def config_for_task(config, task: str):
    """``config``, or a copy that a ``task`` model can run on a batch: one output for a reward model, and for a
    decoder classifier a pad token (Hugging Face refuses batches of more than one without ``pad_token_id``): eos, as
    TRL defaults it, else 0. The training tasks set the tokenizer's pad token instead."""
    changes: dict[str, Any] = {}
    if task == "reward" and config.num_labels != 1:
        changes["num_labels"] = 1
    decoder = not getattr(config, "is_encoder_decoder", False) and config.model_type != "bert"
    if task in SCORED_LAST_TOKEN and decoder and getattr(config, "pad_token_id", None) is None:
        eos = getattr(config, "eos_token_id", None)
        changes["pad_token_id"] = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    if not changes:
        return config
    config = copy.deepcopy(config)
    for name, value in changes.items():
        setattr(config, name, value)
    return config


def reward_layers(classifier_layers: Callable[[Any], list], config) -> list:
    """A reward model's pipeline layers: the family's sequence classifier, with its single output checked."""
    if config.num_labels != 1:
        raise PptkError(
            f"a reward model scores with one output, but config.num_labels is {config.num_labels}; set num_labels=1 "
            "(pptk's reward task and `pptk verify --task reward` do) or train --task sequence-classification"
        )
    return classifier_layers(config)


def last_token_problem(ids: list[int], *, pad_token_id: int | None, where: str) -> str | None:
    """Why Hugging Face would pool another token than the last of ``ids`` (None when it pools that one)."""
    if pad_token_id is not None and ids and ids[-1] == pad_token_id:
        return (
            f"{where}: the last token is the pad token (id {pad_token_id}); Hugging Face's sequence classifier scores "
            "the last token that is not the pad token, so it would score an earlier one. Give the tokenizer a pad "
            "token of its own (not eos), or drop the trailing pad/eos token from the text"
        )
    return None


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
    # a sequence classifier with one output, trained on pairs (pptk.tasks.reward)
    "reward": Task("reward", "AutoModelForSequenceClassification", lambda config: bradley_terry_loss),
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

    - no --task: the one task the architectures name; else the family's default or only task (decoders:
      causal-lm); else an error listing the choices.
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
    default = get_family(config.model_type).default_task or (supported[0] if len(supported) == 1 else None)
    if not named and default is not None:
        return default
    choices = usable or supported
    raise PptkError(
        f"cannot tell the task of {source} ({config.model_type}, {said}); pass --task {' | '.join(choices)}"
    )


@dataclass(frozen=True)
class HeadGaps:
    """How a checkpoint's tensors differ from the task model's, sorted into what Hugging Face expects and the rest."""

    fresh: list[str]  # the task's head, which the checkpoint's architecture lacks: initialised freshly
    dropped: list[str]  # the head of the checkpoint's own task (an LM head when classifying): left unused
    missing: list[str]  # anything else the checkpoint lacks: a broken or mismatched checkpoint
    unexpected: list[str]  # anything else the checkpoint has that the model has no place for


def head_gaps(layers: list, config, task: str, *, base_model_prefix: str, missing, unexpected) -> HeadGaps:
    """Sort ``from_pretrained``'s missing and unexpected keys for ``task``.

    A missing tensor is a fresh head when it belongs to one of the task's optional head layers (``PipeLayer.optional``:
    a classifier, the MLM transform) and ``config.architectures`` names no model of this task, so the checkpoint
    never had that head (a base ``BertModel``, a ``*ForCausalLM`` turned classifier). An unexpected tensor is a
    dropped head when it lies outside the base model and the architectures name another task. The rest stays.
    """
    named = tasks_in_architectures(config)
    head_task = "sequence-classification" if task == "reward" else task  # a reward model is a sequence classifier
    head_prefixes = tuple(layer.hf_prefix for layer in layers if layer.optional and layer.hf_prefix)
    lacks_head = head_task not in named
    fresh = [k for k in missing if lacks_head and head_prefixes and k.startswith(head_prefixes)]
    other_task = bool(named) and head_task not in named
    dropped = [k for k in unexpected if other_task and not k.startswith(base_model_prefix + ".")]
    return HeadGaps(
        fresh=fresh,
        dropped=dropped,
        missing=[k for k in missing if k not in fresh],
        unexpected=[k for k in unexpected if k not in dropped],
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
    if task == "reward":  # pairs: chosen, rejected, chosen, ...
        return torch.arange(input_ids.shape[0]).remainder(2).eq(0).long()
    raise PptkError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
