# Every use of DeepSpeed internals in pptk, one function each, pinned to the DeepSpeed version it was read from.
"""The rest of pptk uses only DeepSpeed's public API (``deepspeed.initialize``, ``deepspeed.pipe``, the
``deepspeed.utils.safe_*`` accessors, the engine's documented methods). What pptk needs beyond that lives here, so
that a DeepSpeed upgrade is checked in one file: each function names the version it was written against, and
``tests/distributed/test_optimizer_wrappers.py`` runs every optimizer wrapper through it on real engines.

The optimizer wrappers DeepSpeed 0.19.8 puts between the engine and the torch optimizer (engine.py
``_do_optimizer_sanity_check``):

=====================================  ==================================  ========================================
config                                 ``engine.optimizer``                fp32 master weights and Adam state
=====================================  ==================================  ========================================
fp32, ZeRO-1                           ``DeepSpeedZeroOptimizer``          ``single_partition_of_fp32_groups``
fp32, ZeRO-0                           the torch optimizer itself          the parameters themselves
bf16 + fp32 grad accumulation, ZeRO-1  ``BF16_Optimizer``                  ``fp32_groups_flat_partition``
bf16, ZeRO-0 (pipeline)                ``BF16_Optimizer`` (bf16 accum)     ``fp32_groups_flat_partition``
bf16 (bf16 accumulation), ZeRO-1       ``DeepSpeedZeroOptimizer``          ``single_partition_of_fp32_groups``
fp16, ZeRO-1                           ``DeepSpeedZeroOptimizer``          ``single_partition_of_fp32_groups``
fp16, ZeRO-0                           ``FP16_Optimizer`` / ``_Unfused``   flat fp32 groups, no per-parameter map
=====================================  ==================================  ========================================
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pptk.errors import PptkError

DEEPSPEED_VERSION = "0.19.8"
ADAM_STATES = ("exp_avg", "exp_avg_sq")


# ----------------------------------------------------------------------------- pipeline module


def partition_by_boundaries(module, boundaries: list[int]) -> None:
    """Give this rank the layers ``boundaries[stage]:boundaries[stage + 1]`` of a ``PipelineModule``.

    Written against DeepSpeed 0.19.8: ``PipelineModule.__init__`` calls the private ``_partition_layers``, which
    must set ``self.parts`` and call ``self._set_bounds``; this rank's stage is ``self._topo.get_coord(
    self.global_rank).pipe``. pptk's ``PlannedPipelineModule._partition_layers`` delegates here.
    """
    if len(boundaries) != module.num_stages + 1:
        raise PptkError(
            f"the stage plan has {len(boundaries) - 1} stages but the topology has {module.num_stages}; "
            f"plan with num_stages={module.num_stages}"
        )
    module.parts = list(boundaries)
    stage_id = module._topo.get_coord(module.global_rank).pipe
    module._set_bounds(start=module.parts[stage_id], stop=module.parts[stage_id + 1])


def tensor_parallel_functions():
    """DeepSpeed 0.19.8's Megatron pair ``(ColumnParallel, RowParallel)`` from ``deepspeed.module_inject.layers``
    (not a documented module): ColumnParallel.apply(group, x) is identity forward / all-reduce of the gradient
    backward; RowParallel.apply(group, y, False) all-reduces forward (in place) / identity backward."""
    from deepspeed.module_inject.layers import ColumnParallel, RowParallel

    return ColumnParallel, RowParallel


def tensor_parallel_group(module) -> tuple[object, int, int]:
    """(group, rank, size) of the tensor-parallel ("model" axis, DeepSpeed's "slice") group of a PipelineModule's
    grid in DeepSpeed 0.19.8 (``PipelineModule.mpu()`` is the ``PipelineParallelGrid``)."""
    grid = module.mpu()
    return grid.get_slice_parallel_group(), grid.get_slice_parallel_rank(), grid.get_slice_parallel_world_size()


def load_layer_files(engine, tag_dir) -> None:
    """Load a checkpoint's per-layer weight files into this stage's layers (any pp), then re-sync tied weights.

    Written against DeepSpeed 0.19.8: ``PipelineModule.load_state_dir(dir, checkpoint_engine)`` reads
    ``layer_NN-model_states.pt`` for each local layer; ``engine.checkpoint_engine`` is the engine's reader.
    """
    engine.module.load_state_dir(str(tag_dir), checkpoint_engine=engine.checkpoint_engine)


def swap_loss_fn(engine, fn: Callable) -> Callable | None:
    """Make the last stage compute ``fn(outputs, labels)`` from now on; returns the previous loss function.

    Written against DeepSpeed 0.19.8: ``PipelineEngine._exec_forward_pass`` reads ``self.module.loss_fn`` on every
    micro-batch, so assigning the module's attribute takes effect at the next ``train_batch``/``eval_batch``.
    """
    previous = engine.module.loss_fn
    engine.module.loss_fn = fn
    return previous


def after_initialize(engine) -> None:
    """What every pptk engine needs right after ``deepspeed.initialize``: refuse an optimizer wrapper pptk cannot
    checkpoint, and correct the fp32 ZeRO-0 pipeline clipping norm (see ``fix_pipeline_clipping``). Written
    against DeepSpeed 0.19.8, as the two functions it calls."""
    check_per_layer_states_supported(engine.optimizer)
    fix_pipeline_clipping(engine)
    fix_dualpipev_eval(engine)


def fix_dualpipev_eval(engine) -> None:
    """Let a DualPipeV engine evaluate a number of micro-batches other than its gradient accumulation steps.

    Written against DeepSpeed 0.19.8: ``DualPipeVEngine._phase1_buffer`` maps a phase-0 buffer to its phase-1 slot
    with ``self.micro_batches`` (the training count) while ``DualPipeVSchedule`` numbers the slots with the
    count it was built for, so ``eval_batch(num_micro_batches=n)`` with n != micro_batches reads an empty slot on
    the last rank. The engine's count is set to n for the duration of the call.
    """
    from deepspeed.runtime.pipe.dualpipev import DualPipeVEngine

    if not isinstance(engine, DualPipeVEngine):
        return
    eval_batch = engine.eval_batch

    def eval_batch_with_own_count(data_iter, *args, num_micro_batches=None, **kwargs):
        training_count = engine.micro_batches
        engine.micro_batches = training_count if num_micro_batches is None else num_micro_batches
        try:
            return eval_batch(data_iter, *args, num_micro_batches=num_micro_batches, **kwargs)
        finally:
            engine.micro_batches = training_count

    engine.eval_batch = eval_batch_with_own_count


def fix_pipeline_clipping(engine) -> None:
    """Make gradient clipping use the norm over every pipeline stage for fp32 without ZeRO.

    Written against DeepSpeed 0.19.8: for fp32 and ZeRO stage 0, ``_take_model_step`` calls
    ``clip_fp32_gradients`` -> ``runtime.utils.clip_grad_norm_(..., mpu=grid)``, which counts a gradient only where
    ``mpu.get_model_parallel_rank() == 0``. A pipeline grid's model-parallel rank is the stage (times the tensor
    rank), so every stage but the first is left out of the norm and the clipping factor depends on pp. (The ZeRO,
    BF16 and fp16 wrappers compute the norm themselves and count every stage.) This replaces the engine's
    ``clip_fp32_gradients`` with the norm over all stages, each tied weight counted once (``ds_pipe_replicated``).
    """
    if (
        engine.zero_optimization()
        or engine.fp16_enabled()
        or engine.bfloat16_enabled()
        or engine.gradient_clipping() <= 0
        or getattr(engine, "grid", None) is None
        or engine.grid.get_pipe_parallel_world_size() == 1
    ):
        return
    import torch.distributed as dist

    def clip_fp32_gradients():
        params = [p for p in engine.module.parameters() if p.grad is not None]
        counted = [p.grad.detach().float().pow(2).sum() for p in params if not getattr(p, "ds_pipe_replicated", False)]
        total = torch.stack(counted).sum() if counted else torch.zeros(())
        dist.all_reduce(total, group=engine.grid.get_pipe_parallel_group())
        norm = total.sqrt()
        coefficient = torch.clamp(engine.gradient_clipping() / (norm + 1e-6), max=1.0)
        for p in params:
            p.grad.detach().mul_(coefficient.to(p.grad.dtype))
        return norm

    engine.clip_fp32_gradients = clip_fp32_gradients


def set_random_seed(seed: int) -> None:
    """Seed Python's, NumPy's, torch's and the accelerator's generators on this rank.

    Written against DeepSpeed 0.19.8: ``deepspeed.runtime.utils.set_random_seed`` (not exported at the top level).
    """
    from deepspeed.runtime.utils import set_random_seed as seed_all

    seed_all(seed)


def op_build_report() -> dict:
    """What ``ds_report`` shows about DeepSpeed's ops: which are prebuilt for this accelerator, which could be
    JIT-compiled here (probed, nothing built), and the accelerator and torch/CUDA they were built for.

    Written against DeepSpeed 0.19.8: ``deepspeed.git_version_info`` (installed_ops, accelerator_name, torch_info),
    ``deepspeed.ops.op_builder.all_ops.ALL_OPS`` and the accelerator's ``_name``.
    """
    import contextlib
    import io

    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name as built_for
    from deepspeed.git_version_info import installed_ops, torch_info
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    accelerator = get_accelerator()
    current = getattr(accelerator, "_name", accelerator.device_name())
    ops = {}
    # Probes print warnings; keep them out of the report.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for name, builder in ALL_OPS.items():
            try:
                compatible = bool(builder.is_compatible(verbose=False))
            except Exception:  # a failing probe means "cannot build here", as in deepspeed's probe_is_compatible
                compatible = False
            ops[name] = {"prebuilt": bool(installed_ops.get(name)) and built_for == current, "compatible": compatible}
    return {
        "accelerator": current,
        "ops_built_for": built_for,
        "ops_built_with": {"torch": torch_info.get("version"), "cuda": torch_info.get("cuda_version")},
        "ops": ops,
    }


# ----------------------------------------------------------------------------- training progress


def training_progress(engine) -> tuple[int, int]:
    """(optimizer steps, samples) the engine has counted.

    Written against DeepSpeed 0.19.8: ``DeepSpeedEngine.global_steps`` / ``global_samples``.
    """
    return int(engine.global_steps), int(engine.global_samples)


def set_global_steps(engine, step: int, samples: int) -> None:
    """Set the engine's step and sample counters, as its own checkpoint loader does on a resume.

    Written against DeepSpeed 0.19.8: ``DeepSpeedEngine._load_checkpoint`` assigns ``global_steps`` and
    ``global_samples``; there is no public setter. Learning-rate schedulers are restored separately.
    """
    engine.global_steps = int(step)
    engine.global_samples = int(samples)


# ----------------------------------------------------------------------------- optimizer wrappers
# These take ``engine.optimizer`` (what deepspeed.initialize wrapped), so they also apply to a wrapper built alone.


def optimizer_wrapper(optimizer) -> str:
    """The class name of the wrapper DeepSpeed put around the torch optimizer, or "torch" when there is none.

    Written against DeepSpeed 0.19.8: ``DeepSpeedZeroOptimizer`` (ZeRO-1/2), ``BF16_Optimizer``,
    ``FP16_Optimizer``, ``FP16_UnfusedOptimizer``; fp32 without ZeRO leaves the torch optimizer unwrapped.
    """
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls in (DeepSpeedZeroOptimizer, BF16_Optimizer, FP16_Optimizer, FP16_UnfusedOptimizer):
        if isinstance(optimizer, cls):
            return cls.__name__
    return "torch"


def base_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that does the update (AdamW, FusedAdam, ...), inside whatever wrapper DeepSpeed added.

    Written against DeepSpeed 0.19.8: every wrapper keeps it as ``.optimizer``.
    """
    return getattr(optimizer, "optimizer", optimizer)


def _flat_fp32_partitions(optimizer) -> list[torch.Tensor] | None:
    """The flat fp32 tensors this rank's base optimizer steps, for the wrappers that map parameters onto them."""
    wrapper = optimizer_wrapper(optimizer)
    if wrapper == "DeepSpeedZeroOptimizer":
        return list(optimizer.single_partition_of_fp32_groups)
    if wrapper == "BF16_Optimizer":
        return list(optimizer.fp32_groups_flat_partition)
    return None


def check_per_layer_states_supported(optimizer) -> None:
    """Refuse, at start-up, a wrapper whose fp32 master weights pptk cannot read per parameter.

    Written against DeepSpeed 0.19.8: ``FP16_Optimizer`` / ``FP16_UnfusedOptimizer`` (fp16 without ZeRO) keep
    flat fp32 groups with no ``_hp_mapping`` on the parameters, so neither ``deepspeed.utils.safe_get_full_*``
    nor pptk's layout-independent checkpoints can address them.
    """
    wrapper = optimizer_wrapper(optimizer)
    if wrapper in ("FP16_Optimizer", "FP16_UnfusedOptimizer"):
        raise PptkError(
            f"fp16 with ZeRO stage 0 runs through DeepSpeed's {wrapper}, whose optimizer state pptk "
            "cannot checkpoint per layer; use zero_optimization.stage 1 (ds_configs/"
            "pipe_zero1_fp16.json does)"
        )


def get_param_state(optimizer, param: torch.nn.Parameter, key: str) -> torch.Tensor:
    """The full fp32 value of ``key`` ("fp32" master weight, "exp_avg", "exp_avg_sq") for one parameter, on CPU.

    Collective over the data-parallel group for the ZeRO and BF16 wrappers (every replica must call it, in the
    same order). Written against DeepSpeed 0.19.8: ``deepspeed.utils.safe_get_full_fp32_param`` /
    ``safe_get_full_optimizer_state`` return None without a ZeRO/BF16 wrapper; the torch optimizer's
    ``state[param]`` then holds the moments and the parameter is its own master copy.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(param) if key == "fp32" else safe_get_full_optimizer_state(param, key)
    if value is None:
        value = param.detach().float() if key == "fp32" else base_optimizer(optimizer).state[param][key]
    return value.detach().cpu().clone()


def set_param_state(optimizer, param: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
    """Write the full fp32 value of ``key`` for one parameter into whatever partition this rank holds.

    Written against DeepSpeed 0.19.8: ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state`` need the
    parameter's ``_hp_mapping`` (set by the ZeRO and BF16 wrappers; None where this rank holds no fragment) and,
    for the moments, linked optimizer fragments (see ``materialise_optimizer_states``).
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if hasattr(param, "_hp_mapping"):
        if key == "fp32":
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
    elif key == "fp32":
        with torch.no_grad():
            param.copy_(value)
    else:
        base_optimizer(optimizer).state[param][key] = value.clone().to(param.device)


def deepspeed_loader_restores_optimizer(engine) -> bool:
    """Whether ``engine.load_checkpoint`` restores this engine's optimizer state (on the layout it was saved on).

    Written against DeepSpeed 0.19.8: without ZeRO, the engine saves ``optimizer.state_dict()`` in the model-states
    file of data-parallel rank 0 only, and ``_load_checkpoint`` hands that dict to ``optimizer.load_state_dict``.
    ``BF16_Optimizer`` (bf16 with ZeRO stage 0 in a pipeline) shards its fp32 masters over the dp ranks anyway
    and its ``load_state_dict`` indexes a per-rank list (``state_dict_list[dp_rank]``): loading fails with
    ``KeyError: 0``, and with dp > 1 the other ranks' shards were never saved.
    """
    return not (optimizer_wrapper(engine.optimizer) == "BF16_Optimizer" and not engine.zero_optimization())


def refresh_master_weights(optimizer) -> None:
    """Copy the module's (possibly bf16/fp16) weights into the wrapper's fp32 master weights.

    Written against DeepSpeed 0.19.8: ``refresh_fp32_params`` on ``DeepSpeedZeroOptimizer``, ``BF16_Optimizer``
    and the fp16 wrappers; the torch optimizer alone has no separate master copy.
    """
    if hasattr(optimizer, "refresh_fp32_params"):
        optimizer.refresh_fp32_params()


def materialise_optimizer_states(optimizer) -> None:
    """Create the base optimizer's state now, in its own format, and link it to the parameters' fragments.

    torch and DeepSpeed optimizers create Adam moments lazily at the first step, and the ZeRO/BF16 wrappers link
    each parameter's ``optim_fragment`` to them only then (``_lazy_init_hp_params_optimizer_state``). Resuming on
    another layout writes moments before any step, so this runs one step of the base optimizer with lr 0 and zero
    gradients on the flat fp32 partitions: the weights do not move, and the state appears in the optimizer's own
    format (torch's tensor step, FusedAdam's int step). The caller then overwrites the moments and the step count.

    Written against DeepSpeed 0.19.8: ``DeepSpeedZeroOptimizer.single_partition_of_fp32_groups`` and
    ``BF16_Optimizer.fp32_groups_flat_partition`` are the flat partitions; both wrappers re-link when
    ``_hp_optimizer_states_linked`` is False and ``_lazy_init_hp_params_optimizer_state()`` runs. Unlinked,
    ``safe_set_full_optimizer_state`` fails inside ``tensor_fragment.get_optim_state_fragment`` with "argument of
    type 'NoneType' is not iterable" (what a BF16_Optimizer resume on another layout did before this function).
    """
    flats = _flat_fp32_partitions(optimizer)
    base = base_optimizer(optimizer)
    params = flats if flats is not None else [p for g in base.param_groups for p in g["params"] if p.requires_grad]
    missing = {id(p) for p in params if not base.state.get(p)}  # by identity: tensors compare element-wise
    if missing:
        lrs = [group["lr"] for group in base.param_groups]
        saved_grads = [p.grad for p in params]
        for group in base.param_groups:
            group["lr"] = 0.0
        for p in params:
            p.grad = torch.zeros_like(p) if id(p) in missing else None
        try:
            base.step()
        finally:
            for group, lr in zip(base.param_groups, lrs):
                group["lr"] = lr
            for p, grad in zip(params, saved_grads):
                p.grad = grad
    if flats is not None:
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def optimizer_step_count(optimizer) -> int:
    """The Adam step count (bias correction) of the base optimizer; 0 before the first step.

    Written against DeepSpeed 0.19.8: torch's Adam/AdamW keep ``state[p]["step"]`` as a tensor, DeepSpeed's
    FusedAdam as an int; both per flat partition under the ZeRO/BF16 wrappers.
    """
    for state in base_optimizer(optimizer).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def set_optimizer_step_count(optimizer, steps: int) -> None:
    """Set the Adam step count of every state entry, keeping each one's type (tensor or int).

    Written against DeepSpeed 0.19.8 (see ``optimizer_step_count``).
    """
    for state in base_optimizer(optimizer).state.values():
        if "step" in state:
            old = state["step"]
            state["step"] = (
                torch.tensor(float(steps), dtype=old.dtype, device=old.device) if torch.is_tensor(old) else int(steps)
            )


# ----------------------------------------------------------------------------- fp16 loss scaling

_SCALER_FIELDS = (
    "cur_scale",
    "cur_iter",
    "last_overflow_iter",
    "cur_hysteresis",
    "scale_factor",
    "scale_window",
    "min_scale",
    "delayed_shift",
)
_SCALE_CONFIG_FIELDS = (
    "dynamic_loss_scale",
    "cur_scale",
    "cur_iter",
    "last_overflow_iter",
    "scale_factor",
    "scale_window",
    "min_loss_scale",
)


def loss_scale_state(optimizer) -> dict | None:
    """The fp16 loss scaler's state as plain JSON values, or None when the optimizer scales nothing (fp32/bf16).

    ``optimizer`` is ``engine.optimizer``. Written against DeepSpeed 0.19.8: ``DeepSpeedZeroOptimizer`` keeps a
    ``loss_scaler`` object (``DynamicLossScaler``: cur_scale, cur_iter, last_overflow_iter, cur_hysteresis, ...;
    or a static ``LossScaler``), the fp16 wrappers a ``loss_scale_config`` (``LossScaleConfig``). Both exist for
    bf16/fp32 too, as a no-op scale of 1.
    """
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is not None and (scaler.dynamic or scaler.cur_scale != 1.0):
        return {
            "kind": "loss_scaler",
            "dynamic": bool(scaler.dynamic),
            **{f: _plain(getattr(scaler, f)) for f in _SCALER_FIELDS if hasattr(scaler, f)},
        }
    config = getattr(optimizer, "loss_scale_config", None)
    if config is not None and config.use_grad_scaling:
        return {"kind": "loss_scale_config", **{f: _plain(getattr(config, f)) for f in _SCALE_CONFIG_FIELDS}}
    return None


def set_loss_scale_state(optimizer, state: dict | None) -> None:
    """Restore what ``loss_scale_state`` returned (after a resume on another layout, where DeepSpeed's own
    optimizer files do not apply). Written against DeepSpeed 0.19.8 (see ``loss_scale_state``)."""
    if state is None:
        return
    fields: tuple[str, ...]
    if state["kind"] == "loss_scaler":
        target = getattr(optimizer, "loss_scaler", None)
        fields = _SCALER_FIELDS
    else:
        target = getattr(optimizer, "loss_scale_config", None)
        fields = _SCALE_CONFIG_FIELDS
    if target is None:
        raise PptkError(
            f"the checkpoint holds fp16 loss-scale state ({state['kind']}) but this run's optimizer "
            f"({type(optimizer).__name__}) has none; resume with the fp16 config it was trained with"
        )
    for field in fields:
        if field in state and hasattr(target, field):
            setattr(target, field, state[field])


def _plain(value):
    return value.item() if torch.is_tensor(value) else value


def time_instructions(
    engine, record: Callable[[str, dict, float, float], None], clock: Callable[[], float] | None = None
) -> None:
    """Call ``record(instruction class name, its kwargs, start, end)`` (``clock()`` seconds, by default
    ``time.perf_counter``) around every pipeline instruction this engine executes (forward, backward, send/recv,
    all-reduces, optimizer step).

    Written against DeepSpeed 0.19.8: ``PipelineEngine._exec_schedule`` looks each instruction's method up in
    ``self._INSTRUCTION_MAP`` (a class attribute keyed by instruction type, extended by ``DualPipeVEngine``) and
    calls it with the instruction's kwargs; an instance attribute of wrapped methods takes precedence.
    """
    import time

    now = clock or time.perf_counter

    def timed(name: str, method: Callable) -> Callable:
        def run(self, **kwargs):
            began = now()
            try:
                return method(self, **kwargs)
            finally:
                record(name, kwargs, began, now())

        return run

    engine._INSTRUCTION_MAP = {
        kind: timed(kind.__name__, method) for kind, method in type(engine)._INSTRUCTION_MAP.items()
    }


def schedule_instructions(*, dualpipev: bool, micro_batches: int, stages: int, stage_id: int) -> list[tuple[str, dict]]:
    """The instructions (class name, kwargs) one pipeline rank executes in a training step, in order.

    Written against DeepSpeed 0.19.8: ``TrainSchedule`` and ``DualPipeVSchedule`` live in
    ``deepspeed.runtime.pipe.schedule``; ``steps()`` yields lists of ``PipeInstruction`` with ``kwargs``.
    """
    from deepspeed.runtime.pipe import schedule

    kind = schedule.DualPipeVSchedule if dualpipev else schedule.TrainSchedule
    steps = kind(micro_batches=micro_batches, stages=stages, stage_id=stage_id).steps()
    return [(type(cmd).__name__, dict(cmd.kwargs)) for cmds in steps for cmd in cmds]
