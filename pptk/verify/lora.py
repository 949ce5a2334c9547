# LoRA in `pptk verify`: peft's adapters on the Hugging Face reference, the same adapters on the ranks, and the names
# both sides compare under.
"""The parent wraps the reference model with ``peft.get_peft_model`` on the modules pptk's own ``resolve_lora_targets``
selects (so both sides adapt the same modules; ``tests/unit/test_lora.py`` checks that selection against peft's
reading of the same settings) and gives every adapter a non-zero B: with peft's B = 0 start, a wrong A, a wrong
scaling or a swapped adapter would not change the loss, and A would get no gradient. It saves those adapters, keyed
as peft saves them, for the ranks, which ``apply_lora`` to their stage and load them.

Both sides then report every parameter under one name: a trained one (adapters, modules_to_save) by its key in
peft's adapter file (``base_model.model.<module>.lora_A.weight``), a frozen one by its plain Hugging Face name
(peft's ``.base_layer`` dropped). Trained ones are compared as verify compares any parameter; frozen ones must come
out of the step exactly as Hugging Face holds them.

LoRA dropout is off in the check, as the model's own dropout is: the two sides draw different masks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from pptk.parallel.hf_weights import hf_names
from pptk.parallel.lora import LoraSettings, apply_lora, peft_config, resolve_lora_targets
from pptk.parallel.lora_export import PEFT_PREFIX, adapter_parameters, load_adapter_state_dict
from pptk.parallel.lora_stage import PLACEHOLDER

ADAPTER_FILE = "adapter.safetensors"  # next to hf/ and batch.pt in a job's folder: what the ranks load


def settings_for_check(settings: LoraSettings) -> LoraSettings:
    """The settings verify runs: the same, with dropout off (see the module docstring)."""
    return dataclasses.replace(settings, dropout=0.0)


def frozen_name(hf_name: str) -> str:
    """A frozen weight's plain Hugging Face name: peft keeps a wrapped module's weight under ``.base_layer``."""
    return hf_name.replace(".base_layer.", ".")


# ---------------------------------------------------------------------------------------------------------------
# The parent: the reference


def add_reference_adapters(
    model: nn.Module, plan, settings: LoraSettings, *, state: dict[str, torch.Tensor] | None = None, seed: int = 0
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """peft's LoRA on the Hugging Face ``model`` (changed in place) and its adapter state, keyed as peft saves it.

    ``state`` None: adapters drawn here, B like the model's own weights (normal, std ``initializer_range``); else
    ``state`` is loaded (the same adapters on a second copy of the model, e.g. the bf16 one).
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers.pytorch_utils import Conv1D

    targets = resolve_lora_targets(plan.layers, settings, task=plan.task)
    adapted = sorted(targets.adapted)
    # GPT-2's Conv1D stores [in, out]; peft would switch fan_in_fan_out on itself, with a warning per module
    fan_in_fan_out = all(isinstance(model.get_submodule(name), Conv1D) for name in adapted)
    config = peft_config(settings, adapted, task=plan.task, fan_in_fan_out=fan_in_fan_out)
    # adapters in the model's dtype, as DeepSpeed's bf16 engine holds them (peft would upcast them to fp32)
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    if state is None:
        std = getattr(plan.config, "initializer_range", 0.02)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if ".lora_B." in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * std)
        state = {key: value.detach().clone() for key, value in get_peft_model_state_dict(peft_model).items()}
    else:
        loaded = set_peft_model_state_dict(peft_model, state)
        unexpected = loaded.unexpected_keys  # type: ignore[attr-defined]  # peft types it as a bare namedtuple
        if unexpected:
            raise RuntimeError(f"peft did not take the adapter keys {unexpected[:3]}")  # peft changed its keys
    return peft_model, state


def reference_names(peft_model: nn.Module) -> dict[str, str | None]:
    """peft model parameter name -> the name verify compares it under; None for peft's frozen copy of a module that
    trains in full (``.original_module``: the pipeline trains that module in place and holds no copy)."""
    from peft import get_peft_model_state_dict

    # get_peft_model_state_dict returns the parameters' own storage, under the keys peft saves them with
    saved = {tensor.data_ptr(): key for key, tensor in get_peft_model_state_dict(peft_model).items()}
    names: dict[str, str | None] = {}
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            if param.data_ptr() not in saved:
                raise RuntimeError(f"peft trains {name} but does not save it")  # peft changed its state dict
            names[name] = saved[param.data_ptr()]
        elif ".original_module." in name:
            names[name] = None
        else:
            names[name] = frozen_name(name.removeprefix(PEFT_PREFIX))
    return names


def rename_reference(reference: dict, peft_model: nn.Module) -> dict:
    """The reference step's per-parameter dicts under the compared names, plus the set of frozen names."""
    names = reference_names(peft_model)
    renamed = {
        key: {names[n]: value for n, value in reference[key].items() if names[n] is not None}
        for key in ("start", "params", "noise")
        if key in reference
    }
    frozen = {names[n] for n, param in peft_model.named_parameters() if not param.requires_grad and names[n]}
    return reference | renamed | {"frozen": frozen}


def adapter_numel(state: dict[str, torch.Tensor]) -> int:
    """Parameters LoRA adds to the model (modules_to_save train weights the model already counts)."""
    return sum(tensor.numel() for key, tensor in state.items() if ".lora_" in key)


# ---------------------------------------------------------------------------------------------------------------
# The ranks


def add_stage_adapters(module: nn.Module, plan, settings: LoraSettings, *, work: Path, seed: int) -> None:
    """This stage with LoRA, its adapters those the parent saved for the reference."""
    from safetensors.torch import load_file

    apply_lora(module, plan, settings, seed=seed)
    load_adapter_state_dict(module, plan, load_file(work / ADAPTER_FILE))


def stage_names(module: nn.Module, plan) -> dict[str, str | None]:
    """Pipeline parameter key -> the name verify compares it under (see ``reference_names``); None for a stage's
    placeholder, which Hugging Face does not have."""
    trained = {id(param): key for key, param in adapter_parameters(module, plan.layers)}
    hf = hf_names(module, plan.layers)
    names: dict[str, str | None] = {}
    for key, param in module.named_parameters():
        if id(param) in trained:
            names[key] = trained[id(param)]
        elif key.rsplit(".", 1)[-1] == PLACEHOLDER:
            names[key] = None
        else:
            names[key] = frozen_name(hf[key])
    return names
