# LoRA on pipeline stages: peft's adapters injected into a built stage's layers, under Hugging Face module names.
"""LoRA is applied to a built stage as tensor parallelism is: one function over the stage's modules.

- ``LoraSettings``: r, alpha, dropout, which modules get an adapter and which train in full (modules_to_save);
- ``resolve_lora_targets``: what those names select in the *whole* model (every stage decides alike), with the
  errors for a name that matches nothing or a module LoRA cannot wrap;
- ``apply_lora``: freezes the stage, injects peft's own LoRA layers (``peft.inject_adapter_in_model``) into each
  local layer, keeps the first layer's output differentiable and gives a stage with nothing to train a placeholder,
  so DeepSpeed's pipeline engine and optimizers run it;
- ``check_lora_layout`` / ``lora_layout_problems``: what LoRA cannot run with yet (tp > 1);
- ``settings_record`` / ``settings_from_record``: the settings as a checkpoint's manifest keeps them.

What DeepSpeed's engine needs of a frozen stage (gradients across it, a placeholder to train): ``lora_stage``.

Names follow peft on the Hugging Face model: a module of pipeline layer ``i`` is ``layers[i].hf_prefix + local
name``, so ``target_modules`` and ``modules_to_save`` mean on the pipeline what they mean in
``peft.get_peft_model(hf_model, LoraConfig(...))``. State dicts, adapter files, merging: ``pptk.parallel.lora_export``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pptk.errors import PptkError
from pptk.models import PipeLayer
from pptk.parallel.layout import Layout
from pptk.parallel.lora_stage import add_placeholder_parameter, keep_stage_output_differentiable
from pptk.parallel.tensor_parallel import shard_spec

ALL_LINEAR = "all-linear"
# peft's PeftModelFor{Sequence,Token}Classification add these to modules_to_save: the task head trains in full.
CLASSIFIER_NAMES = ("classifier", "score")
PEFT_TASK_TYPES = {
    "causal-lm": "CAUSAL_LM",
    "sequence-classification": "SEQ_CLS",
    "token-classification": "TOKEN_CLS",
}
ADAPTER_NAME = "default"  # peft's adapter name; pptk trains one adapter per model
TRAINED_IN_FULL_ATTR = "pptk_lora_trained_in_full"  # marks a modules_to_save parameter (see adapter_state_dict)


@dataclass(frozen=True)
class LoraSettings:
    """What to train with LoRA; the fields mean what peft's ``LoraConfig`` fields of the same role mean.

    target_modules: ``"all-linear"`` (every nn.Linear / GPT-2 Conv1D inside the blocks: attention and MLP
    projections, never the embeddings, the LM head, a pooler or a task head); a sequence of names (a module is
    targeted when its Hugging Face name equals one or ends with ``"." + name``: ``("q_proj", "v_proj")``); or any
    other string, a regular expression that must match a whole Hugging Face module name.
    modules_to_save: modules trained in full, e.g. a new classifier head (a module is selected when its Hugging Face
    name ends with the given name). For classification tasks the head (``classifier``/``score``) is added, as peft
    does for those task types.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = ALL_LINEAR
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # lists from JSON or flags are welcome; stored as tuples so the settings stay hashable and frozen
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, list | set | frozenset):
                object.__setattr__(self, name, tuple(sorted(value) if isinstance(value, set | frozenset) else value))
        problems = []
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            problems.append(f"r (the adapter rank) must be a positive integer, got {self.r!r}")
        if not _is_finite_number(self.alpha) or self.alpha <= 0:
            problems.append(f"alpha must be a finite number > 0 (scaling = alpha / r), got {self.alpha!r}")
        if not _is_finite_number(self.dropout) or not 0 <= self.dropout < 1:
            problems.append(f"dropout must be a finite number with 0 <= dropout < 1, got {self.dropout!r}")
        problems += _name_problems("target_modules", self.target_modules, allow_regex=True)
        problems += _name_problems("modules_to_save", self.modules_to_save, allow_regex=False)
        if problems:
            raise PptkError("invalid LoRA settings:\n  " + "\n  ".join(problems))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def settings_record(settings: LoraSettings) -> dict:
    """The settings as JSON (a checkpoint's manifest, RunConfig.to_dict): lists for tuples."""
    return {
        "r": settings.r,
        "alpha": settings.alpha,
        "dropout": settings.dropout,
        "target_modules": settings.target_modules
        if isinstance(settings.target_modules, str)
        else list(settings.target_modules),
        "modules_to_save": list(settings.modules_to_save),
    }


def settings_from_record(record: dict) -> LoraSettings:
    return LoraSettings(**record)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _name_problems(field: str, value: object, *, allow_regex: bool) -> list[str]:
    if allow_regex and isinstance(value, str):
        if not value:
            return [f'{field} is empty; use "{ALL_LINEAR}", a list of module names, or a regular expression']
        if value == ALL_LINEAR:
            return []
        try:
            re.compile(value)
        except re.error as err:
            return [f"{field} {value!r} is not a valid regular expression ({err})"]
        return []
    if not isinstance(value, tuple) or not all(isinstance(name, str) and name for name in value):
        kind = f'"{ALL_LINEAR}", a regular expression or ' if allow_regex else ""
        return [f"{field} must be {kind}a list of non-empty module names, got {value!r}"]
    if allow_regex and not value:
        return [f'{field} is an empty list; name at least one module, or use "{ALL_LINEAR}"']
    return []


def lora_layout_problems(*, tp: int) -> list[str]:
    """What LoRA cannot train on yet, for the callers that gather every problem into one error (RunConfig)."""
    if tp > 1:
        return [
            f"LoRA with tp({tp}) > 1 is not supported yet: tensor-parallel linears are sharded pptk modules "
            "that peft cannot wrap (sharded adapters come later). Use tp=1 and spread the ranks over pp and dp"
        ]
    return []


def check_lora_layout(layout: Layout) -> None:
    """Refuse layouts LoRA cannot train on yet, before any rank starts."""
    problems = lora_layout_problems(tp=layout.tp)
    if problems:
        raise PptkError("; ".join(problems))


# ---------------------------------------------------------------------------------------------------------------
# Which modules of the whole model are adapted or trained in full


@dataclass(frozen=True)
class ModelModule:
    """One module of the whole model, as every stage can see it without building it."""

    name: str  # Hugging Face module name
    kind: str  # class name
    role: str  # the pipeline layer's role
    is_linear: bool  # nn.Linear or GPT-2's Conv1D: what pptk puts adapters on
    is_layer: bool  # the pipeline layer itself (peft replaces children, so it cannot wrap this one)
    tied: bool  # part of a tied layer (the word embeddings, shared with a tied LM head)


@dataclass(frozen=True)
class LoraTargets:
    """What LoraSettings select in one model: Hugging Face module names, the same on every stage."""

    adapted: frozenset[str]
    trained_in_full: frozenset[str]
    modules_to_save: tuple[str, ...]  # the names as peft's adapter_config.json lists them (task head included)
    task_type: str | None  # peft's TaskType for the task, None where peft has none (masked-lm)

    def describe(self) -> str:
        return f"LoRA adapters on {len(self.adapted)} modules ({', '.join(collapse_layer_numbers(self.adapted))})" + (
            f"; trained in full: {', '.join(sorted(self.trained_in_full))}" if self.trained_in_full else ""
        )


def hf_module_name(layer: PipeLayer, local: str) -> str:
    """The Hugging Face name of module ``local`` (a dotted name inside the layer, "" for the layer itself)."""
    return layer.hf_prefix + local if local else layer.hf_prefix.rstrip(".")


def collapse_layer_numbers(names) -> list[str]:
    """transformer.h.0.attn.c_attn, transformer.h.1.attn.c_attn -> transformer.h.N.attn.c_attn (in model order)."""
    return list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".N", name) for name in sorted(names, key=_natural)))


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def model_modules(layers: list[PipeLayer]) -> list[ModelModule]:
    """Every module of every pipeline layer, built on the meta device (no memory), tied layers once."""
    from accelerate import init_empty_weights
    from transformers.pytorch_utils import Conv1D

    modules: list[ModelModule] = []
    seen_tied: set[str] = set()
    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
        for layer in layers:
            if layer.tied_key:
                if layer.tied_key in seen_tied:
                    continue
                seen_tied.add(layer.tied_key)
            built = layer.spec.build()
            for local, module in built.named_modules():
                if not hf_module_name(layer, local):
                    continue  # a head layer holding only a child (lm_head) or nothing: no name of its own
                modules.append(
                    ModelModule(
                        name=hf_module_name(layer, local),
                        kind=type(module).__name__,
                        role=layer.role,
                        is_linear=isinstance(module, nn.Linear | Conv1D),
                        is_layer=not local,
                        tied=layer.tied_key is not None,
                    )
                )
    return modules


def effective_modules_to_save(settings: LoraSettings, task: str) -> tuple[str, ...]:
    """settings.modules_to_save, plus the classification head as peft adds it for classification task types."""
    names = list(settings.modules_to_save)
    if PEFT_TASK_TYPES.get(task) in ("SEQ_CLS", "TOKEN_CLS"):
        names += [name for name in CLASSIFIER_NAMES if name not in names]
    return tuple(names)


def peft_config(settings: LoraSettings, target_modules, *, task: str | None = None, fan_in_fan_out: bool = False):
    """peft's LoraConfig for these settings (``target_modules`` resolved by the caller)."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft says int, computes alpha / r: floats work
        lora_dropout=settings.dropout,
        target_modules=target_modules,
        modules_to_save=list(effective_modules_to_save(settings, task)) if task else None,
        task_type=PEFT_TASK_TYPES.get(task) if task else None,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
    )


def resolve_lora_targets(layers: list[PipeLayer], settings: LoraSettings, *, task: str) -> LoraTargets:
    """Match the settings against the whole model (not one stage: a stage may hold no match) with peft's rules."""
    from peft.tuners.tuners_utils import check_target_module_exists

    modules = model_modules(layers)
    linear_names = ", ".join(
        collapse_layer_numbers(m.name for m in modules if m.is_linear and not m.is_layer)
    )  # the names a user can target, for the error messages

    to_save = effective_modules_to_save(settings, task)
    trained_in_full = _modules_to_save(modules, settings, to_save)

    if settings.target_modules == ALL_LINEAR:
        wanted: Any = sorted(m.name for m in modules if m.role == "block" and m.is_linear)
    else:
        wanted = settings.target_modules
    # peft's own matcher, with modules_to_save: a module trained in full (or inside one) never gets an adapter
    matcher = peft_config(settings, wanted if isinstance(wanted, str) else list(wanted), task=task)
    adapted = [m for m in modules if bool(check_target_module_exists(matcher, m.name))]

    if settings.target_modules != ALL_LINEAR:
        patterns = [wanted] if isinstance(wanted, str) else list(wanted)
        for pattern in patterns:
            single = peft_config(settings, pattern if isinstance(wanted, str) else [pattern])
            if not any(check_target_module_exists(single, m.name) for m in modules):
                raise PptkError(
                    f"LoRA target_modules {pattern!r} matches no module of this model; its linear layers are: "
                    f"{linear_names}. Name one of them, or its last parts (q_proj, attn.c_attn), or use {ALL_LINEAR!r}"
                )
    for module in adapted:
        if module.tied:
            raise PptkError(
                f"LoRA target_modules selects {module.name} ({module.kind}), the word embeddings that a tied LM head "
                "shares; adapters on tied embeddings are not supported yet: target the blocks' linear layers "
                f"({linear_names})"
            )
        if not module.is_linear:
            raise PptkError(
                f"LoRA target_modules selects {module.name} ({module.kind}); pptk puts adapters on linear layers "
                f"only (nn.Linear, GPT-2's Conv1D): {linear_names}. Narrow the pattern to those"
            )
        if module.is_layer:
            raise PptkError(
                f"LoRA target_modules selects {module.name} ({module.kind}), which is a whole pipeline layer that "
                "peft cannot wrap in place; train it in full with modules_to_save instead"
            )
    if not adapted:
        raise PptkError(
            f"LoRA target_modules {settings.target_modules!r} selects no module of this model once modules_to_save "
            f"{list(to_save)} are left out; its linear layers are: {linear_names}"
        )
    return LoraTargets(
        adapted=frozenset(m.name for m in adapted),
        trained_in_full=frozenset(trained_in_full),
        modules_to_save=to_save,
        task_type=PEFT_TASK_TYPES.get(task),
    )


def _modules_to_save(modules: list[ModelModule], settings: LoraSettings, to_save: tuple[str, ...]) -> set[str]:
    """peft's rule (utils.other._set_trainable): a module whose name ends with a listed name; the outermost wins."""
    chosen: set[str] = set()
    for name in to_save:
        matched = [m for m in modules if m.name.endswith(name)]
        if not matched:
            if name in settings.modules_to_save:  # the classification names peft adds may match nothing
                raise PptkError(
                    f"LoRA modules_to_save {name!r} matches no module of this model; name a module by (the end of) its "
                    "Hugging Face name, e.g. 'classifier'"
                )
            continue
        for module in matched:
            if module.tied:
                raise PptkError(
                    f"LoRA modules_to_save {name!r} selects {module.name}, the word embeddings that a tied LM head "
                    "shares; training tied embeddings in full beside LoRA is not supported yet: drop it from "
                    "modules_to_save"
                )
            chosen.add(module.name)
    return {name for name in chosen if not any(name.startswith(other + ".") for other in chosen)}


# ---------------------------------------------------------------------------------------------------------------
# Applying LoRA to a built stage


def apply_lora(module: nn.Module, plan, settings: LoraSettings, *, seed: int = 1234) -> LoraTargets:
    """Freeze this stage's weights and give its targeted modules peft LoRA adapters; returns what was selected.

    ``module``: a DeepSpeed PipelineModule (this rank's stage) or a SequentialPipe, built and loaded; ``plan``: its
    PipelinePlan. Call before ``deepspeed.initialize`` so the optimizer sees only the adapters (and modules_to_save).
    Adapters are initialised as peft does (A random, B zero), seeded per layer so any pp layout starts alike.
    A stage left with nothing to train (an embedding-only stage) gets a zero placeholder (add_placeholder_parameter);
    the first layer's output is kept differentiable (keep_stage_output_differentiable).
    """
    from pptk.parallel.pipeline import local_layers

    sharded = [name for name, p in module.named_parameters() if shard_spec(p) is not None]
    if sharded:
        raise PptkError(
            f"apply_lora got a tensor-parallel stage ({sharded[0]} is sharded); LoRA with tp > 1 is not supported "
            "yet: use tp=1 (see check_lora_layout)"
        )
    if any(is_lora_layer(m) for m in module.modules()):
        raise PptkError("apply_lora was called twice on this stage; it already holds LoRA adapters")
    targets = resolve_lora_targets(plan.layers, settings, task=plan.task)
    module.requires_grad_(False)
    for index, layer_module in local_layers(module, plan.layers):
        layer = plan.layers[index]
        local = {hf_module_name(layer, name): (name, child) for name, child in layer_module.named_modules()}
        adapted = sorted(local[name][0] for name in targets.adapted if name in local)
        if adapted:
            _inject(layer_module, adapted, settings, seed=seed + index)
        for name in targets.trained_in_full & set(local):
            for param in local[name][1].parameters():
                param.requires_grad_(True)
                setattr(param, TRAINED_IN_FULL_ATTR, True)
    keep_stage_output_differentiable(module, plan.layers)
    if not any(p.requires_grad for p in module.parameters()):
        add_placeholder_parameter(module, plan.layers)
    return targets


def _inject(layer_module: nn.Module, local_names: list[str], settings: LoraSettings, *, seed: int) -> None:
    from peft import inject_adapter_in_model
    from transformers.pytorch_utils import Conv1D

    children = dict(layer_module.named_modules())
    # an exact-name pattern: peft full-matches a string against each local name, so nothing else is caught
    pattern = "(?:" + "|".join(re.escape(name) for name in local_names) + ")"
    # GPT-2's Conv1D stores [in, out]; peft would switch this on per module anyway, with a warning each
    fan_in_fan_out = all(isinstance(children[name], Conv1D) for name in local_names)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(peft_config(settings, pattern, fan_in_fan_out=fan_in_fan_out), layer_module)
    wrapped = sorted(name for name, child in layer_module.named_modules() if is_lora_layer(child))
    if wrapped != local_names:
        raise RuntimeError(f"peft wrapped {wrapped}, expected {local_names}")  # peft changed its matching rules


def is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)
