# From a RunConfig to a running DeepSpeed pipeline engine: layout, filled config, process group, grid, engine.
"""The first two steps need no process group and run on every rank alike, so bad input fails everywhere the
same way before any rank waits on another: ``resolve_layout`` and ``resolve_ds_config``. Then
``init_distributed`` forms the process group and ``build_engine`` builds this rank's stage on DeepSpeed's grid.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from pptk import deepspeed_compat
from pptk.errors import PptkError
from pptk.parallel.layout import Layout
from pptk.parallel.lora import LoraSettings, apply_lora
from pptk.parallel.pipeline import PipelinePlan, build_pipeline_module
from pptk.training.config import RunConfig
from pptk.training.ds_config import default_ds_config, fill_ds_config, load_ds_config, validate_ds_config


def on_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_layout(run: RunConfig, ds_config: dict) -> Layout:
    """The layout, checked against the launcher's WORLD_SIZE before any process group exists."""
    parallel = run.parallel
    zero = parallel.zero_stage
    if zero is None:
        json_zero = ds_config.get("zero_optimization", {}).get("stage", 1)
        zero = 1 if json_zero == "auto" else int(json_zero)
    accum = parallel.grad_accum_steps
    if accum is None and parallel.global_batch_size is None:
        accum = 2 * parallel.pp  # enough micro-batches to keep the 1F1B bubble at a third or less
    return Layout.from_world(
        world_size=world_size(),
        pp=parallel.pp,
        tp=parallel.tp,
        micro_batch_size=parallel.micro_batch_size,
        grad_accum_steps=accum,
        global_batch_size=parallel.global_batch_size,
        zero_stage=zero,
        schedule=parallel.schedule,
    )


def load_run_ds_config(run: RunConfig) -> dict:
    return load_ds_config(run.optim.ds_config or default_ds_config())


def resolve_ds_config(run: RunConfig, raw: dict, layout: Layout, *, total_steps: int) -> dict:
    """The DeepSpeed JSON with its "auto" values filled from the run, then checked against the layout."""
    optim = run.optim
    warmup = optim.warmup_steps or max(1, total_steps // 20)
    config = fill_ds_config(
        raw,
        layout=layout,
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        warmup_steps=warmup,
        total_steps=total_steps,
        grad_clip=optim.grad_clip,
    )
    validate_ds_config(config, layout=layout)
    return config


def init_distributed() -> None:
    """The process group: gloo on CPU, NCCL on GPUs (DeepSpeed picks it), with a finite collective timeout."""
    import deepspeed

    from pptk.launch.ranks import COLLECTIVE_TIMEOUT

    deepspeed_compat.check_build_locks()
    if on_cpu():
        deepspeed_compat.skip_unused_cpu_ops()
    else:
        deepspeed_compat.check_cuda_arch_list()
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu() else None, timeout=COLLECTIVE_TIMEOUT)


def build_engine(
    plan: PipelinePlan,
    *,
    layout: Layout,
    ds_config: dict,
    seed: int,
    loss_fn: Callable,
    activation_checkpoint_interval: int = 0,
    dynamic_shape: bool = False,
    lora: LoraSettings | None = None,
):
    """This rank's stage on DeepSpeed's pp x tp x dp grid, wrapped in its pipeline engine.

    ``lora``: the stage's weights frozen and LoRA adapters added (``pptk.parallel.lora.apply_lora``) once its weights
    are loaded, so the optimizer sees only what trains.
    """
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, PipeModelDataParallelTopology

    if torch.distributed.get_world_size() != layout.world_size:
        raise PptkError(
            f"the layout needs {layout.world_size} ranks but the process group has {torch.distributed.get_world_size()}"
        )
    # Reproducible dropout: each rank's generators are seeded by the run's seed and its global rank, so a rerun, or
    # the same layout spread over several nodes, draws the same masks. The tp ranks of a stage share their seed (the
    # "model" axis is the grid's innermost): dropout on the activations they all hold must drop the same elements.
    deepspeed_compat.set_random_seed(seed + torch.distributed.get_rank() // layout.tp)
    if layout.tp > 1:  # gradients are reduced over dp only; activations travel between matching tp ranks
        topology = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
    else:
        topology = PipeDataParallelTopology(num_pp=layout.pp, num_dp=layout.dp)
    module = build_pipeline_module(
        plan,
        topology=topology,
        seed=seed,
        dynamic_shape=dynamic_shape,
        activation_checkpoint_interval=activation_checkpoint_interval,
        loss_fn=loss_fn,
    )
    if lora is not None:
        apply_lora(module, plan, lora, seed=seed)
    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=ds_config)
    deepspeed_compat.after_initialize(engine)
    return engine
