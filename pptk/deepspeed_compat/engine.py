# DeepSpeed internals of the pipeline module and engine: partitioning, layer files, schedules, progress.
from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch

from pptk.deepspeed_compat.optimizer import check_per_layer_states_supported
from pptk.errors import PptkError

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


def build_each_layer_with(module, build: Callable[[], None], make_layer: Callable[[int, object], object]) -> None:
    """Run ``PipelineModule._build`` (``build``) with ``make_layer(index, spec)`` making each local layer, so a
    layer can be finished (initialised, sharded) before the next one is built.

    Written against DeepSpeed 0.19.8: ``_build`` calls ``spec.build()`` for every ``LayerSpec`` (``TiedLayerSpec``
    included, once per key) in ``module._layer_specs[module._local_start:module._local_stop]``; DualPipeVModule runs
    it once per phase with the phase's bounds. The specs are swapped for copies whose ``build`` calls
    ``make_layer``, and restored afterwards.
    """
    from deepspeed.pipe import LayerSpec

    specs = module._layer_specs
    original = list(specs)
    for index in range(module._local_start, module._local_stop):
        spec = original[index]
        if isinstance(spec, LayerSpec):
            wrapped = copy.copy(spec)
            wrapped.build = partial(make_layer, index, spec)
            specs[index] = wrapped
    try:
        build()
    finally:
        specs[:] = original


def tensor_parallel_functions():
    """DeepSpeed 0.19.8's Megatron pair ``(ColumnParallel, RowParallel)`` from ``deepspeed.module_inject.layers``
    (not a documented module): ColumnParallel.apply(group, x) is identity forward / all-reduce of the gradient
    backward; RowParallel.apply(group, y, False) all-reduces forward (in place) / identity backward."""
    from deepspeed.module_inject.layers import ColumnParallel, RowParallel

    return ColumnParallel, RowParallel


def vocab_parallel_cross_entropy(logits, labels, *, group, start: int, end: int, vocab_size: int):
    """The summed cross-entropy of ``labels`` (-100 ignored) over logits split by vocabulary across ``group``, this
    rank holding columns ``[start, end)`` of ``vocab_size``.

    Written against DeepSpeed 0.19.8: ``deepspeed.sequence.cross_entropy.vocab_parallel_cross_entropy`` (its
    PyTorch backend: three all-reduces, fp32). ``global_vocab_size`` is given so that it skips its shard-layout
    check, an ``all_gather_into_tensor`` that gloo lacks; pptk's shards are equal by construction."""
    from deepspeed.sequence.cross_entropy import vocab_parallel_cross_entropy as ds_cross_entropy

    return ds_cross_entropy(
        logits,
        labels,
        tp_group=group,
        vocab_start_index=start,
        vocab_end_index=end,
        global_vocab_size=vocab_size,
        reduction="sum",
    )


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
    checkpoint, correct the fp32 ZeRO-0 pipeline clipping norm (see ``fix_pipeline_clipping``), let DualPipeV
    evaluate any count of micro-batches and the bf16 engine run frozen tied weights. Written against DeepSpeed
    0.19.8, as the functions it calls."""
    check_per_layer_states_supported(engine.optimizer)
    fix_pipeline_clipping(engine)
    fix_dualpipev_eval(engine)
    allow_frozen_tied_weights(engine)
    separate_receive_buffers(engine)
    release_loss_stage_outputs(engine)


def release_loss_stage_outputs(engine) -> None:
    """Free the last stage's outputs (the logits) once a training forward has computed the loss from them.

    Written against DeepSpeed 0.19.8: ``PipelineEngine._exec_forward_pass`` stores every stage's outputs in
    ``pipe_buffers['outputs'][buffer_id]``; the other stages free theirs in ``_exec_backward_pass``, but the last
    stage returns from it before that line, so its logits stay until the buffer is reused: two stale [B, S, V]
    tensors held through every step (2 GiB for a 128k vocabulary at 4k tokens in bf16). The loss's graph keeps what
    its backward needs; the outputs are read again only when evaluation returns logits (``eval_return_logits``).
    DualPipeV frees its loss stage's outputs itself.
    """
    from deepspeed.runtime.pipe import schedule
    from deepspeed.runtime.pipe.dualpipev import DualPipeVEngine

    if isinstance(engine, DualPipeVEngine) or not engine.is_last_stage():
        return
    forward = engine._INSTRUCTION_MAP[schedule.ForwardPass]

    def forward_then_release(self, buffer_id, **kwargs):
        forward(self, buffer_id=buffer_id, **kwargs)
        if self.module.training and not self.eval_return_logits:
            self.pipe_buffers["outputs"][buffer_id] = None

    engine._INSTRUCTION_MAP = {**engine._INSTRUCTION_MAP, schedule.ForwardPass: forward_then_release}


def separate_receive_buffers(engine) -> None:
    """Give each received tensor a buffer of its own dtype (a MoE router loss across a middle stage needs it).

    Written against DeepSpeed 0.19.8: ``PipelineEngine._allocate_or_extend_buffers(idx, shape, dtype)`` hands out
    the activation and the gradient receive buffers from one list (``_grad_layer_buf``) by position, reusing any
    buffer large enough whatever its dtype. A middle stage that receives (hidden, attention mask, router sums) and
    sends back the gradients of the floating ones got the router probabilities' fp32 gradient in the int64 mask
    buffer: garbage, and every step skipped as an overflow. A buffer of another dtype is replaced; the tensors
    already handed out keep theirs (the engine holds them), so only the first step allocates.
    """
    if not hasattr(engine, "_allocate_or_extend_buffers"):
        return
    allocate = engine._allocate_or_extend_buffers

    def allocate_by_dtype(idx, shape, dtype):
        buffers = engine._grad_layer_buf
        if idx < len(buffers) and buffers[idx].dtype != dtype:
            buffers[idx] = engine._allocate_buffer(shape, dtype=dtype, num_buffers=1)[0]
            return buffers[idx]
        return allocate(idx, shape, dtype)

    engine._allocate_or_extend_buffers = allocate_by_dtype


def allow_frozen_tied_weights(engine) -> None:
    """Let the bf16 pipeline engine reduce tied gradients when a tied weight is frozen (LoRA's word embeddings).

    Written against DeepSpeed 0.19.8: with ``BF16_Optimizer`` (bf16 + fp32 gradient accumulation),
    ``PipelineEngine._exec_reduce_tied_grads`` reads ``weight._hp_grad`` of every weight in
    ``module.get_tied_weights_and_groups()`` and skips it when None; the optimizer sets that attribute only on the
    parameters it holds, so a frozen tied weight raised AttributeError at the first step. A frozen one gets None.
    """
    if not hasattr(engine.module, "get_tied_weights_and_groups"):
        return
    for weight, _ in engine.module.get_tied_weights_and_groups():
        if not weight.requires_grad and not hasattr(weight, "_hp_grad"):
            weight._hp_grad = None


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
    ``clip_fp32_gradients`` with the norm over all stages and tp ranks, each tied weight counted once
    (``ds_pipe_replicated``) and each tensor replicated over tp once (``tensor_model_parallel`` marks the sharded
    ones), so every rank applies the same factor.
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

    tp_rank = engine.grid.get_slice_parallel_rank()

    def counts(p) -> bool:
        # a tied copy once (its first stage); a tp-sharded tensor on every tp rank, a replicated one on tp rank 0
        tp_sharded = getattr(p, "tensor_model_parallel", False)
        return not getattr(p, "ds_pipe_replicated", False) and (tp_sharded or tp_rank == 0)

    def clip_fp32_gradients():
        params = [p for p in engine.module.parameters() if p.grad is not None]
        counted = [p.grad.detach().float().pow(2).sum() for p in params if counts(p)]
        total = torch.stack(counted).sum() if counted else torch.zeros(())
        # over every stage and tp rank of this replica: DeepSpeed's "model parallel" group of a pipeline grid
        dist.all_reduce(total, group=engine.grid.get_model_parallel_group())
        norm = total.sqrt()
        coefficient = torch.clamp(engine.gradient_clipping() / (norm + 1e-6), max=1.0)
        for p in params:
            p.grad.detach().mul_(coefficient.to(p.grad.dtype))
        return norm

    engine.clip_fp32_gradients = clip_fp32_gradients


# ----------------------------------------------------------------------------- training progress


def training_progress(engine) -> tuple[int, int]:
    """(optimizer steps, samples) the engine has counted.

    Written against DeepSpeed 0.19.8: ``DeepSpeedEngine.global_steps`` / ``global_samples``.
    """
    return int(engine.global_steps), int(engine.global_samples)


def skipped_optimizer_steps(engine) -> int:
    """How many optimizer steps the engine skipped because the gradients were not finite.

    Written against DeepSpeed 0.19.8: ``DeepSpeedEngine._take_model_step`` (which the pipeline engine's optimizer
    step calls) counts ``skipped_steps`` when the optimizer wrapper reports ``overflow``. Every DeepSpeed wrapper
    checks the gradients (ZeRO's DeepSpeedZeroOptimizer in fp32 too, fp16's loss scaler, BF16_Optimizer with
    ``bf16.check_grad_overflow``, on by default); torch's own optimizer (fp32 at ZeRO stage 0) never skips a step
    (``tests/distributed/test_optimizer_wrappers.py`` checks each).
    """
    return int(engine.skipped_steps)


def set_global_steps(engine, step: int, samples: int) -> None:
    """Set the engine's step and sample counters, as its own checkpoint loader does on a resume.

    Written against DeepSpeed 0.19.8: ``DeepSpeedEngine._load_checkpoint`` assigns ``global_steps`` and
    ``global_samples``; there is no public setter. Learning-rate schedulers are restored separately.
    """
    engine.global_steps = int(step)
    engine.global_samples = int(samples)


# ----------------------------------------------------------------------------- instructions


def time_instructions(
    engine, record: Callable[[str, dict, float, float], None], clock: Callable[[], float] | None = None
) -> None:
    """Call ``record(instruction class name, its kwargs, start, end)`` (``clock()`` seconds, by default
    ``time.perf_counter``) around every pipeline instruction this engine executes (forward, backward, send/recv,
    all-reduces, optimizer step).

    Written against DeepSpeed 0.19.8: ``PipelineEngine._exec_schedule`` looks each instruction's method up in
    ``self._INSTRUCTION_MAP`` (a class attribute keyed by instruction type, extended by ``DualPipeVEngine``) and
    calls it with the instruction's kwargs; an instance attribute of wrapped methods takes precedence (and wraps
    any that ``release_loss_stage_outputs`` set).
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

    engine._INSTRUCTION_MAP = {kind: timed(kind.__name__, method) for kind, method in engine._INSTRUCTION_MAP.items()}


def schedule_instructions(*, dualpipev: bool, micro_batches: int, stages: int, stage_id: int) -> list[tuple[str, dict]]:
    """The instructions (class name, kwargs) one pipeline rank executes in a training step, in order.

    Written against DeepSpeed 0.19.8: ``TrainSchedule`` and ``DualPipeVSchedule`` live in
    ``deepspeed.runtime.pipe.schedule``; ``steps()`` yields lists of ``PipeInstruction`` with ``kwargs``.
    """
    from deepspeed.runtime.pipe import schedule

    kind = schedule.DualPipeVSchedule if dualpipev else schedule.TrainSchedule
    steps = kind(micro_batches=micro_batches, stages=stages, stage_id=stage_id).steps()
    return [(type(cmd).__name__, dict(cmd.kwargs)) for cmds in steps for cmd in cmds]
