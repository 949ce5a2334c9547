# `--partition-method profile`: each layer's forward+backward time on this device and batch shape.
"""DeepSpeed's own ``partition_method="profile"`` raises NotImplementedError. pptk times the layers one at a time:
layer i is built (random weights), run forward on the output of layer i-1 and backward from a unit gradient, timed,
and freed before layer i+1 is built, so the peak memory is one layer plus one micro-batch's activations. The
exact min-max planner (``partition.plan_stages``) then balances the measured times instead of FLOP estimates.
"""

from __future__ import annotations

import os
import statistics
import time
from functools import partial

import torch
from deepspeed.pipe import TiedLayerSpec

from pptk.models import PipeLayer


def profile_device() -> torch.device:
    on_cpu = os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()
    return torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())


def _first_inputs(input_names: tuple[str, ...], *, vocab_size: int, batch: int, seq_len: int, device) -> tuple:
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for name in input_names:
        if name == "input_ids":
            t = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
        elif name == "attention_mask":
            t = torch.ones(batch, seq_len, dtype=torch.long)
        else:  # token_type_ids
            t = torch.zeros(batch, seq_len, dtype=torch.long)
        tensors.append(t.to(device))
    return tuple(tensors)


def _as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_layers(
    layers: list[PipeLayer],
    *,
    input_names: tuple[str, ...],
    vocab_size: int,
    micro_batch_size: int,
    seq_len: int,
    repeats: int = 3,
    device: torch.device | None = None,
) -> tuple[float, ...]:
    """Median forward+backward milliseconds of every layer, on one micro-batch of ``micro_batch_size x seq_len``."""
    device = device or profile_device()
    inputs = _first_inputs(input_names, vocab_size=vocab_size, batch=micro_batch_size, seq_len=seq_len, device=device)
    times = []
    for layer in layers:
        module = layer.spec.build().to(device)
        spec = layer.spec
        forward = partial(spec.forward_fn, module) if isinstance(spec, TiedLayerSpec) and spec.forward_fn else module
        samples, outputs = [], inputs
        for _ in range(repeats + 1):  # the first run warms up (allocations, lazy initialisation) and is dropped
            module.zero_grad(set_to_none=True)
            leaves = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in _as_tuple(inputs))
            _sync(device)
            began = time.perf_counter()
            outputs = _as_tuple(forward(leaves if len(leaves) > 1 else leaves[0]))
            floats = [t for t in outputs if t.is_floating_point() and t.requires_grad]
            if floats:
                torch.autograd.backward(floats, [torch.ones_like(t) for t in floats])
            _sync(device)
            samples.append(time.perf_counter() - began)
        times.append(1000.0 * statistics.median(samples[1:]))
        inputs = tuple(t.detach() for t in outputs)
        del module
    return tuple(times)


def agree_on_profile(plan):
    """Every rank profiled on its own; all take rank 0's measurements (and plan), so the stages agree."""
    import dataclasses

    import torch.distributed as dist

    from pptk.parallel.partition import plan_stages

    if plan.stages.method != "profile":
        return plan
    shared = [plan.stages.measured_ms]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] == plan.stages.measured_ms:
        return plan
    stages = plan_stages(
        list(plan.stages.costs),
        num_stages=plan.stages.num_stages,
        method="profile",
        schedule=plan.stages.schedule,
        measured_ms=tuple(shared[0]),
    )
    return dataclasses.replace(plan, stages=stages)
