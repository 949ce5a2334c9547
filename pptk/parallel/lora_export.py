# LoRA adapters in and out of pipeline stages: peft's state-dict keys, its adapter directory, and merged weights.
"""A stage's adapters are keyed as peft saves them (``get_peft_model_state_dict`` + ``PeftModel.save_pretrained``):
``base_model.model.<Hugging Face module name>.lora_A.weight`` / ``.lora_B.weight``, and a module trained in full
(modules_to_save) as ``base_model.model.<Hugging Face parameter name>``. Each stage gives its own keys; the union over
stages is the whole adapter, which ``write_adapter_dir`` writes so that ``PeftModel.from_pretrained(hf_model, out)``
loads it. ``merge_lora`` folds the adapters into the base weights (in fp32) for a plain Hugging Face export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pptk.errors import PptkError
from pptk.models import PipeLayer
from pptk.parallel.lora import (
    ADAPTER_NAME,
    TRAINED_IN_FULL_ATTR,
    LoraSettings,
    hf_module_name,
    is_lora_layer,
    peft_config,
)
from pptk.parallel.lora_stage import PLACEHOLDER

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# a peft LoRA parameter inside a layer: "<module>.lora_A.default.weight" (peft drops the adapter name on save)
_LORA_PARAM = re.compile(rf"(?P<module>.+)\.(?P<part>lora_[AB])\.{ADAPTER_NAME}\.weight")


def adapter_parameters(module: nn.Module, layers: list[PipeLayer]):
    """(peft key, parameter) for every adapter and trained-in-full parameter this stage holds."""
    from pptk.parallel.pipeline import local_layers

    for index, layer_module in local_layers(module, layers):
        layer = layers[index]
        for name, param in layer_module.named_parameters():
            if _LORA_PARAM.fullmatch(name) or getattr(param, TRAINED_IN_FULL_ATTR, False):
                yield peft_key(layer.hf_prefix, name), param


def peft_key(hf_prefix: str, local: str) -> str:
    """peft's file key of a trained parameter ``local`` (its name inside a pipeline layer whose Hugging Face prefix is
    ``hf_prefix``): an adapter weight without peft's adapter name, a module trained in full under its own name."""
    found = _LORA_PARAM.fullmatch(local)
    if found:
        return f"{PEFT_PREFIX}{hf_prefix}{found['module']}.{found['part']}.weight"
    return PEFT_PREFIX + hf_prefix + local


def adapter_state_dict(module: nn.Module, plan) -> dict[str, torch.Tensor]:
    """This stage's adapter weights (and modules_to_save), keyed as peft saves them; detached, not copied.

    A stage without adapters (an embedding-only stage) gives an empty dict.
    """
    return {key: param.detach() for key, param in adapter_parameters(module, plan.layers)}


@torch.no_grad()
def load_adapter_state_dict(module: nn.Module, plan, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights keyed as peft saves them (a whole adapter, or this stage's part) into this stage.

    Every adapter parameter of the stage must be in ``state`` with its shape; keys of other stages are ignored.
    """
    params = dict(adapter_parameters(module, plan.layers))
    missing = sorted(key for key in params if key not in state)
    mismatched = [
        f"{key}: file {list(state[key].shape)} vs stage {list(params[key].shape)}"
        for key in sorted(params)
        if key in state and state[key].shape != params[key].shape
    ]
    if missing or mismatched:
        problems = ([f"missing {', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else "")] if missing else []) + (
            [f"shape mismatch {'; '.join(mismatched[:6])}"] if mismatched else []
        )
        raise PptkError(
            f"the adapter weights do not fit this stage ({' | '.join(problems)}); load the adapter trained "
            "with the same model and LoRA settings (r, target_modules, modules_to_save)"
        )
    for key, param in params.items():
        param.copy_(state[key])


def adapter_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """The Hugging Face module names that carry an adapter in a peft-keyed state dict."""
    return sorted({key[len(PEFT_PREFIX) :].rsplit(".lora_", 1)[0] for key in state if ".lora_" in key})


def write_adapter_dir(
    state: dict[str, torch.Tensor], settings: LoraSettings, base_config, out: str | Path, *, task: str
) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors``, as ``PeftModel.save_pretrained`` writes them.

    ``state``: the whole adapter (the union of every stage's ``adapter_state_dict``). ``target_modules`` is written
    as the explicit list of adapted modules (as peft writes it for "all-linear"), so peft adapts exactly these.
    """
    from safetensors.torch import save_file

    if not state:
        raise PptkError("no adapter weights to write: the state dict is empty; apply_lora adds them to the stages")
    foreign = [key for key in state if not key.startswith(PEFT_PREFIX)]
    if foreign:
        raise PptkError(f"adapter keys must start with {PEFT_PREFIX!r} (adapter_state_dict's keys), got {foreign[:3]}")
    modules = adapter_modules(state)
    problems = []
    for name in modules:
        a, b = (state.get(f"{PEFT_PREFIX}{name}.lora_{part}.weight") for part in "AB")
        if a is None or b is None:
            problems.append(f"{name} has {'lora_B' if a is None else 'lora_A'} only")
        elif a.shape[0] != settings.r or b.shape[1] != settings.r:
            problems.append(f"{name} has rank {a.shape[0]}/{b.shape[1]}, settings say r={settings.r}")
    if problems or not modules:
        raise PptkError(
            "the adapter state does not match the settings: "
            + ("; ".join(problems[:6]) if problems else "it holds no lora_A/lora_B weights")
            + ". Gather every stage's adapter_state_dict and pass the settings they were trained with"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = peft_config(settings, modules, task=task)
    config.base_model_name_or_path = getattr(base_config, "_name_or_path", None) or None
    config.inference_mode = True  # as PeftModel.save_pretrained records it; from_pretrained(is_trainable=) decides
    (out / ADAPTER_CONFIG).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=_json_value))
    save_file(
        {key: tensor.detach().cpu().contiguous() for key, tensor in state.items()},
        str(out / ADAPTER_WEIGHTS),
        metadata={"format": "pt"},
    )
    return out


def _json_value(value):
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def merged_weight(lora_layer: Any) -> torch.Tensor:
    """base + B @ A * scaling, computed in fp32 (transposed for GPT-2's Conv1D), in the base weight's dtype."""
    base = lora_layer.get_base_layer()
    a = lora_layer.lora_A[ADAPTER_NAME].weight.float()
    b = lora_layer.lora_B[ADAPTER_NAME].weight.float()
    delta = (b @ a) * lora_layer.scaling[ADAPTER_NAME]
    if lora_layer.fan_in_fan_out:
        delta = delta.T
    return (base.weight.float() + delta).to(base.weight.dtype)


@torch.no_grad()
def merge_lora(module: nn.Module, plan) -> list[str]:
    """Fold every adapter of this stage into its base weight and put the plain layer back; returns the merged
    Hugging Face module names.

    Afterwards the stage's parameter names are the ones it had before apply_lora, so the usual export
    (Hugging Face names per stage) writes a merged model. The stage stays frozen; modules_to_save keep their trained
    weights in place.
    """
    from pptk.parallel.pipeline import local_layers

    merged = []
    for index, layer_module in local_layers(module, plan.layers):
        if hasattr(layer_module, PLACEHOLDER):
            delattr(layer_module, PLACEHOLDER)  # its hook then adds nothing
        for name, child in list(layer_module.named_modules()):
            if not is_lora_layer(child):
                continue
            base = child.get_base_layer()
            base.weight.copy_(merged_weight(child))
            parent_name, _, attr = name.rpartition(".")
            setattr(layer_module.get_submodule(parent_name), attr, base)
            merged.append(hf_module_name(plan.layers[index], name))
    return merged
