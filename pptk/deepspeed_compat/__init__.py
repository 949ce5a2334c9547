# Every use of DeepSpeed internals in pptk, one function each, pinned to the DeepSpeed version it was read from.
"""The rest of pptk uses only DeepSpeed's public API (``deepspeed.initialize``, ``deepspeed.pipe``, the
``deepspeed.utils.safe_*`` accessors, the engine's documented methods). What pptk needs beyond that lives here, so
that a DeepSpeed upgrade is checked in one package: each function names the version it was written against, and
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


May import: errors, logs. Every other room that needs a DeepSpeed internal asks this one.
"""

from pptk.deepspeed_compat.checkpoint_writes import checkpoint_writes_through
from pptk.deepspeed_compat.engine import (
    after_initialize,
    allow_frozen_tied_weights,
    build_each_layer_with,
    fix_dualpipev_eval,
    fix_pipeline_clipping,
    load_layer_files,
    partition_by_boundaries,
    schedule_instructions,
    separate_receive_buffers,
    set_global_steps,
    skipped_optimizer_steps,
    swap_loss_fn,
    tensor_parallel_functions,
    tensor_parallel_group,
    time_instructions,
    training_progress,
    vocab_parallel_cross_entropy,
)
from pptk.deepspeed_compat.ops import (
    build_op,
    check_build_locks,
    check_cuda_arch_list,
    op_build_report,
    set_random_seed,
    skip_unused_cpu_ops,
)
from pptk.deepspeed_compat.optimizer import (
    ADAM_STATES,
    base_optimizer,
    check_per_layer_states_supported,
    deepspeed_loader_restores_optimizer,
    get_param_state,
    loss_scale_state,
    materialise_optimizer_states,
    optimizer_step_count,
    optimizer_wrapper,
    refresh_master_weights,
    set_loss_scale_state,
    set_optimizer_step_count,
    set_param_state,
)

DEEPSPEED_VERSION = "0.19.8"

__all__ = [
    "ADAM_STATES",
    "DEEPSPEED_VERSION",
    "after_initialize",
    "allow_frozen_tied_weights",
    "base_optimizer",
    "build_each_layer_with",
    "build_op",
    "check_build_locks",
    "check_cuda_arch_list",
    "check_per_layer_states_supported",
    "checkpoint_writes_through",
    "deepspeed_loader_restores_optimizer",
    "fix_dualpipev_eval",
    "fix_pipeline_clipping",
    "get_param_state",
    "load_layer_files",
    "loss_scale_state",
    "materialise_optimizer_states",
    "op_build_report",
    "optimizer_step_count",
    "optimizer_wrapper",
    "partition_by_boundaries",
    "refresh_master_weights",
    "schedule_instructions",
    "separate_receive_buffers",
    "set_global_steps",
    "set_loss_scale_state",
    "set_optimizer_step_count",
    "set_param_state",
    "set_random_seed",
    "skip_unused_cpu_ops",
    "skipped_optimizer_steps",
    "swap_loss_fn",
    "tensor_parallel_functions",
    "tensor_parallel_group",
    "time_instructions",
    "training_progress",
    "vocab_parallel_cross_entropy",
]
