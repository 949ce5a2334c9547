# The DeepSpeed settings `pptk verify`'s ranks run with, and the gradient accumulation its reference step matches.
from __future__ import annotations

import torch


def verify_ds_config(
    *, micro_batch_size: int, micro_batches: int, dp: int, zero_stage: int, precision: str, tp: int = 1
) -> dict:
    """One plain-SGD step's config (the exact check, not a training setup), with the shipped bf16 sections in bf16."""
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "train_batch_size": micro_batch_size * micro_batches * dp,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # plain SGD: the exact check, not a training setup
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    if tp > 1:
        from pptk.training.ds_config import TENSOR_PARALLEL_PIPELINE

        config["pipeline"] = dict(TENSOR_PARALLEL_PIPELINE)
    if precision == "bf16":  # the precision sections of the config users train with
        from pptk.training.ds_config import load_ds_config, shipped_config

        shipped = load_ds_config(shipped_config("bf16"))
        config["bf16"] = shipped["bf16"]
        if zero_stage >= 1:  # fp32 accumulation is BF16_Optimizer's ZeRO-1 mode; ZeRO-0 accumulates in bf16
            config["data_types"] = shipped["data_types"]
    return config


def grad_accum_dtype(precision: str, zero_stage: int) -> torch.dtype:
    """The dtype DeepSpeed accumulates gradients in under ``verify_ds_config``: the reference accumulates alike."""
    return torch.float32 if precision == "fp32" or zero_stage >= 1 else torch.bfloat16
