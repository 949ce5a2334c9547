# What LoRA trains in each pipeline layer, counted before anything is built: `pptk plan`'s memory forecast.
from __future__ import annotations

from dataclasses import dataclass

import torch

from pptk.models import PipeLayer
from pptk.parallel.lora import LoraSettings, hf_module_name, resolve_lora_targets


@dataclass(frozen=True)
class LayerLoraParams:
    """One pipeline layer under LoRA: what it adds and what of its own weights still trains."""

    adapters: int  # lora_A + lora_B parameters LoRA adds to the layer: r * (in + out) per adapted linear
    trained_in_full: int  # parameters of its modules_to_save (part of the layer's own count; not frozen)


def lora_parameters_per_layer(layers: list[PipeLayer], settings: LoraSettings, *, task: str) -> list[LayerLoraParams]:
    """One entry per pipeline layer (a tied layer's copies alike), from the layers built on the meta device."""
    from accelerate import init_empty_weights

    targets = resolve_lora_targets(layers, settings, task=task)
    counts = []
    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
        for layer in layers:
            adapters = trained = 0
            for local, module in layer.spec.build().named_modules():
                name = hf_module_name(layer, local)
                if name in targets.adapted:  # nn.Linear [out, in] or GPT-2's Conv1D [in, out]: the sum is the same
                    adapters += settings.r * sum(module.weight.shape)
                if name in targets.trained_in_full:
                    trained += sum(p.numel() for p in module.parameters())
            counts.append(LayerLoraParams(adapters=adapters, trained_in_full=trained))
    return counts
