# validate_ds_config: what a filled DeepSpeed config must satisfy for this run (ZeRO with pipelines, offload,
# precision on this accelerator, the batch arithmetic), every problem listed at once.

import pytest
import torch

from pptk.errors import PptkError
from pptk.parallel.layout import Layout
from pptk.training.ds_config import cpu_supports, fill_ds_config, load_ds_config, shipped_config, validate_ds_config

LAYOUT = Layout(pp=2, dp=2, micro_batch_size=2, grad_accum_steps=4)  # global batch 16
RECIPE = dict(lr=3e-4, weight_decay=0.1, warmup_steps=10, total_steps=100, grad_clip=1.0)


def filled(**changes):
    config = fill_ds_config(load_ds_config(shipped_config("fp32")), layout=LAYOUT, **RECIPE)
    return config | changes


def validation_error(config, *, layout=LAYOUT, accelerator="cuda"):
    with pytest.raises(PptkError) as err:
        validate_ds_config(config, layout=layout, accelerator=accelerator)
    assert str(err.value).startswith("the DeepSpeed config does not fit this run:\n  ")
    return str(err.value)


def test_validate_accepts_the_filled_cpu_config_here():
    validate_ds_config(filled(), layout=LAYOUT)


def test_validate_zero_stage_2_with_pipeline():
    message = validation_error(filled(zero_optimization={"stage": 2}))
    assert "zero_optimization.stage 2 != layout zero_stage 1" in message
    assert (
        "zero_optimization.stage 2 with pp(2) > 1: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 "
        "only; use stage 1"
    ) in message


def test_validate_zero_stage_3_without_pipeline_is_fine():
    layout = Layout(pp=1, dp=2, micro_batch_size=2, grad_accum_steps=4, zero_stage=3)
    validate_ds_config(filled(zero_optimization={"stage": 3}), layout=layout, accelerator="cuda")


@pytest.mark.parametrize(
    "offload",
    [
        {"offload_optimizer": {"device": "cpu"}},
        {"offload_param": {"device": "nvme", "nvme_path": "/tmp"}},
        {"cpu_offload": True},
    ],
)
def test_validate_offload_with_pipeline(offload):
    message = validation_error(filled(zero_optimization={"stage": 1} | offload))
    key = next(iter(offload))
    assert f"zero_optimization.{key} with pp(2) > 1: pptk does not offload with pipelines" in message
    assert "remove the offload section or use pp=1" in message


def test_validate_offload_device_none_or_no_pipeline_is_fine():
    validate_ds_config(
        filled(zero_optimization={"stage": 1, "offload_optimizer": {"device": "none"}}),
        layout=LAYOUT,
        accelerator="cuda",
    )
    layout = Layout(pp=1, dp=4, micro_batch_size=2, grad_accum_steps=4)
    config = fill_ds_config({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}, layout=layout)
    validate_ds_config(config, layout=layout, accelerator="cuda")


def test_validate_fp16_and_bf16_together():
    message = validation_error(filled(bf16={"enabled": True}, fp16={"enabled": True}))
    assert "bf16.enabled and fp16.enabled are both true; enable one" in message


def test_validate_bf16_on_cpu_is_allowed_and_warns_when_the_cpu_lacks_bf16_units():
    config = filled(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    if cpu_supports("bf16"):
        validate_ds_config(config, layout=LAYOUT, accelerator="cpu")
    else:
        with pytest.warns(
            UserWarning,
            match="bf16 on CPU ranks runs through DeepSpeed's BF16_Optimizer as on GPUs, "
            "but this CPU has no bf16 instructions",
        ):
            validate_ds_config(config, layout=LAYOUT, accelerator="cpu")


def test_validate_fp16_on_cpu_follows_the_cpu_accelerator():
    config = filled(fp16={"enabled": True, "loss_scale": 0})
    if cpu_supports("fp16"):
        validate_ds_config(config, layout=LAYOUT, accelerator="cpu")
    else:
        message = validation_error(config, accelerator="cpu")
        assert "fp16 is enabled but this run is on CPU" in message
        assert "DeepSpeed's CPU accelerator supports fp16 only on CPUs with AVX512-FP16/AMX-FP16" in message
        assert f"use bf16 ({shipped_config('bf16')}) or fp32 ({shipped_config('fp32')})" in message


def test_cpu_supports_asks_what_deepspeeds_cpu_accelerator_asks():
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    assert cpu_supports("fp16") == bool(CPU_Accelerator().is_fp16_supported())
    assert cpu_supports("fp32")


def test_validate_detects_ds_accelerator_cpu(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    if not cpu_supports("fp16"):
        with pytest.raises(PptkError, match="fp16 is enabled but this run is on CPU \\(DS_ACCELERATOR='cpu'"):
            validate_ds_config(filled(fp16={"enabled": True}), layout=LAYOUT)


def test_validate_detects_missing_cuda(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    if torch.cuda.is_available() or cpu_supports("fp16"):
        validate_ds_config(filled(fp16={"enabled": True}), layout=LAYOUT)
    else:
        with pytest.raises(PptkError, match="CUDA available: False\\) and DeepSpeed's CPU accelerator"):
            validate_ds_config(filled(fp16={"enabled": True}), layout=LAYOUT)


def test_validate_fp16_without_zero_is_refused_for_per_layer_checkpoints():
    layout = Layout(pp=2, dp=2, micro_batch_size=2, grad_accum_steps=4, zero_stage=0)
    message = validation_error(filled(fp16={"enabled": True}, zero_optimization={"stage": 0}), layout=layout)
    assert "fp16 with zero_optimization.stage 0 runs through DeepSpeed's FP16_Optimizer" in message
    assert "use stage 1, as ds_configs/pipe_zero1_fp16.json does" in message


def test_validate_bf16_fp32_accumulation_needs_zero_1():
    layout = Layout(pp=2, dp=2, micro_batch_size=2, grad_accum_steps=4, zero_stage=0)
    config = filled(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"}, zero_optimization={"stage": 0})
    message = validation_error(config, layout=layout)
    assert "bf16 with data_types.grad_accum_dtype fp32 needs zero_optimization.stage 1" in message


def test_validate_batch_arithmetic_with_numbers():
    message = validation_error(filled(train_batch_size=10))
    assert (
        "train_batch_size(10) != train_micro_batch_size_per_gpu(2) * gradient_accumulation_steps(4) * dp(2) = 16"
    ) in message


def test_validate_lists_every_problem():
    config = filled(
        train_micro_batch_size_per_gpu=4,
        gradient_accumulation_steps=2,
        train_batch_size=12,
        gradient_clipping="auto",
        zero_optimization={"stage": 0},
    )
    assert validation_error(config).split("\n  ")[1:] == [
        'gradient_clipping is still "auto"; fill it with fill_ds_config first',
        "zero_optimization.stage 0 != layout zero_stage 1",
        "train_micro_batch_size_per_gpu(4) != layout micro_batch_size(2)",
        "gradient_accumulation_steps(2) != layout grad_accum_steps(4)",
        "train_batch_size(12) != train_micro_batch_size_per_gpu(4) * gradient_accumulation_steps(2) * dp(2) = 16",
    ]
