# What DeepSpeed's pipeline engine needs of a LoRA stage: gradients across a frozen first layer, and something to
# train on a stage that holds no adapter.
"""Both fixes are applied by ``pptk.parallel.lora.apply_lora``; they are DeepSpeed 0.19.8 behaviour seen from the
stage, not DeepSpeed internals, so they live beside LoRA rather than in ``pptk.deepspeed_compat``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pptk.models import PipeLayer

PLACEHOLDER = "pptk_lora_placeholder"  # the zero parameter of a stage with nothing to train; never checkpointed


def keep_stage_output_differentiable(module: nn.Module, layers: list[PipeLayer]) -> None:
    """Make the first layer's float outputs require grad, as peft's ``enable_input_require_grads`` does.

    With the embeddings frozen, their output is a tensor without grad. DeepSpeed's pipeline engine runs a stage's
    backward as ``output.backward(received_grad)`` on every float output, which fails for an output that does not
    require grad (DeepSpeed #3895/#4479, qlora-pipe #56): an embedding-only first stage, or any first stage whose
    adapters are all elsewhere. The reentrant activation checkpoint likewise drops the adapters' gradients of a block
    whose input does not require grad. Only the first layer needs this: later stages receive inputs that DeepSpeed
    marks as requiring grad. The cost is one gradient of the embedding output, which nothing consumes.
    """
    from pptk.parallel.pipeline import local_layers

    for index, layer_module in local_layers(module, layers):
        if index == 0:
            layer_module.register_forward_hook(_outputs_require_grad)


def _outputs_require_grad(_module: nn.Module, _inputs: Any, outputs: Any) -> None:
    if not torch.is_grad_enabled():
        return
    for tensor in outputs if isinstance(outputs, tuple) else (outputs,):
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not tensor.requires_grad:
            tensor.requires_grad_(True)


def add_placeholder_parameter(module: nn.Module, layers: list[PipeLayer]) -> None:
    """Give a stage with nothing to train one zero parameter, added (times 0) to its first layer's output.

    DeepSpeed 0.19.8 cannot build an optimizer over no parameter ("optimizer got an empty parameter list", every
    wrapper), and a parameter that gets no gradient breaks ZeRO-1 (``reduce_ipg_grads``) and the bf16 optimizer
    (``get_global_norm_of_tensors``). One that takes part in the forward gets a zero gradient, so every wrapper steps,
    clips and checkpoints it like any other; Adam keeps it at exactly zero, and ``x + 0 * p`` is ``x``. It lives in
    the first local layer (key ``{index}.pptk_lora_placeholder`` or ``tied_modules.{key}.pptk_lora_placeholder``),
    so the stage's keys keep the pipeline's layout; ``merge_lora`` removes it, checkpoint conversion must skip it.
    """
    from pptk.parallel.pipeline import local_layers

    _, first = min(local_layers(module, layers), key=lambda item: item[0])
    dtype = next((p.dtype for p in first.parameters()), torch.float32)
    first.register_parameter(PLACEHOLDER, nn.Parameter(torch.zeros(1, dtype=dtype)))
    first.register_forward_hook(_add_placeholder)


def _add_placeholder(module: nn.Module, _inputs: Any, outputs: Any) -> Any:
    placeholder = getattr(module, PLACEHOLDER, None)  # gone after merge_lora
    if placeholder is None or not torch.is_grad_enabled():
        return None
    zero = placeholder * 0
    if isinstance(outputs, torch.Tensor):
        return outputs + zero.to(outputs.dtype)
    for i, tensor in enumerate(outputs):
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            return (*outputs[:i], tensor + zero.to(tensor.dtype), *outputs[i + 1 :])
    return None
