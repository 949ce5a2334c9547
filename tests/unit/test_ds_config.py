# DeepSpeed configs: loading errors, filling "auto", the disagreement report and the shipped JSONs (validation:
# test_ds_config_validation.py).
import json
import warnings
from pathlib import Path

import pytest
import torch

from pptk.errors import PptkError
from pptk.parallel.layout import Layout
from pptk.training.ds_config import (
    SHIPPED,
    default_ds_config,
    fill_ds_config,
    load_ds_config,
    precision_of,
    shipped_config,
    validate_ds_config,
)

LAYOUT = Layout(pp=2, dp=2, micro_batch_size=2, grad_accum_steps=4)  # global batch 16
RECIPE = dict(lr=3e-4, weight_decay=0.1, warmup_steps=10, total_steps=100, grad_clip=1.0)
SHIPPED_NAMES = ["pipe_zero1_bf16.json", "pipe_zero1_cpu.json", "pipe_zero1_fp16.json"]


def all_auto(scheduler="WarmupDecayLR"):
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "eps": 1e-8}},
        "scheduler": {"type": scheduler, "params": {"warmup_num_steps": "auto", "warmup_type": "linear"}},
    }


# --- load_ds_config -------------------------------------------------------------------------------------------


def test_shipped_configs_are_package_data_found_by_precision_or_name():
    from importlib import resources

    package_dir = Path(str(resources.files("pptk.ds_configs")))
    for precision, name in SHIPPED.items():
        assert shipped_config(precision) == package_dir / name and shipped_config(precision).is_file()
        assert shipped_config(name) == shipped_config(f"ds_configs/{name}") == shipped_config(precision)
    assert shipped_config("cpu") == shipped_config("fp32")
    with pytest.raises(PptkError, match="'fp8' is not a shipped DeepSpeed config; choose a precision"):
        shipped_config("fp8")


def test_a_checkout_without_install_reads_the_repository_folder(monkeypatch):
    """pptk run from a checkout with PYTHONPATH=. has no pptk.ds_configs (the install maps it), as on the GPU box."""
    import pptk.training.ds_config as module

    def not_installed(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(module.resources, "files", not_installed)
    repository = Path(__file__).resolve().parents[2] / "ds_configs"
    assert shipped_config("bf16") == repository / SHIPPED["bf16"] and shipped_config("bf16").is_file()


def test_default_config_is_bf16_on_gpus_and_fp32_on_cpu():
    assert default_ds_config("cuda") == shipped_config("bf16")
    assert default_ds_config("cpu") == shipped_config("fp32")


def test_load_by_shipped_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where no ds_configs/ folder exists, as in the Docker image's site-packages
    assert load_ds_config("bf16") == load_ds_config(shipped_config("bf16"))
    assert load_ds_config("ds_configs/pipe_zero1_cpu.json") == load_ds_config(shipped_config("fp32"))
    # what pptk/train.py computes from an installed package: site-packages/ds_configs/..., which does not exist
    assert load_ds_config("/venv/lib/site-packages/ds_configs/pipe_zero1_bf16.json")["bf16"] == {"enabled": True}
    with pytest.raises(PptkError, match="does not exist"):  # another folder: a typo, not the shipped file
        load_ds_config(tmp_path / "my-configs" / "pipe_zero1_bf16.json")


def test_load_dict_is_a_deep_copy():
    source = {"zero_optimization": {"stage": 1}}
    loaded = load_ds_config(source)
    loaded["zero_optimization"]["stage"] = 0
    assert source == {"zero_optimization": {"stage": 1}}


def test_load_missing_file_names_path_and_shipped_configs(tmp_path):
    with pytest.raises(PptkError) as err:
        load_ds_config(tmp_path / "nope.json")
    assert f"DeepSpeed config {str(tmp_path / 'nope.json')!r} does not exist" in str(err.value)
    assert "pipe_zero1_bf16.json, pipe_zero1_cpu.json, pipe_zero1_fp16.json" in str(err.value)


def test_load_invalid_json_gives_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "steps_per_print": 10,\n}\n')
    with pytest.raises(PptkError) as err:
        load_ds_config(path)
    assert str(err.value).startswith(f"{path} is not valid JSON: line 4 column 1: ")
    assert "no trailing commas" in str(err.value)


def test_load_rejects_duplicate_keys(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"zero_optimization": {"stage": 1, "stage": 0}}')
    with pytest.raises(PptkError, match="sets 'stage' twice"):
        load_ds_config(path)


def test_load_rejects_non_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(PptkError, match="holds a JSON list, not an object"):
        load_ds_config(path)


# --- fill_ds_config -------------------------------------------------------------------------------------------


def test_fill_every_auto_field():
    filled = fill_ds_config(all_auto(), layout=LAYOUT, precision="bf16", **RECIPE)
    assert filled == {
        "train_batch_size": 16,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.1, "eps": 1e-8}},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"warmup_num_steps": 10, "warmup_type": "linear", "total_num_steps": 100, "warmup_max_lr": 3e-4},
        },
    }


def test_fill_does_not_touch_its_input():
    config = all_auto()
    fill_ds_config(config, layout=LAYOUT, precision="bf16", **RECIPE)
    assert config == all_auto()


def test_fill_warmup_lr_has_no_total_steps():
    filled = fill_ds_config(all_auto("WarmupLR"), layout=LAYOUT, precision="fp32", **RECIPE)
    assert filled["scheduler"]["params"] == {"warmup_num_steps": 10, "warmup_type": "linear", "warmup_max_lr": 3e-4}
    assert filled["bf16"] == {"enabled": False}


def test_fill_warmup_cosine_lr_has_no_max_lr():
    filled = fill_ds_config(all_auto("WarmupCosineLR"), layout=LAYOUT, precision="bf16", **RECIPE)
    assert filled["scheduler"]["params"] == {"warmup_num_steps": 10, "warmup_type": "linear", "total_num_steps": 100}


def test_fill_writes_keys_the_json_leaves_out():
    filled = fill_ds_config(
        {"optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupDecayLR"}}, layout=LAYOUT, **RECIPE
    )
    assert filled == {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
        "train_batch_size": 16,
        "zero_optimization": {"stage": 1},
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.1}},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"warmup_num_steps": 10, "total_num_steps": 100, "warmup_max_lr": 3e-4},
        },
    }


def test_fill_leaves_client_optimizer_and_scheduler_alone():
    filled = fill_ds_config({}, layout=LAYOUT, **RECIPE)
    assert "optimizer" not in filled and "scheduler" not in filled
    assert filled["gradient_clipping"] == 1.0


def test_fill_accepts_concrete_values_equal_to_the_arguments():
    config = all_auto() | {"train_batch_size": 16, "gradient_clipping": 1}
    config["optimizer"]["params"]["lr"] = 0.0003
    result = fill_ds_config(config, layout=LAYOUT, precision="bf16", **RECIPE)
    assert result["train_batch_size"] == 16
    assert result["gradient_clipping"] == 1
    assert result["optimizer"]["params"]["lr"] == 3e-4


def test_fill_reports_every_disagreement_at_once():
    config = all_auto() | {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.5}
    config["zero_optimization"]["stage"] = 0
    config["optimizer"]["params"]["lr"] = 1e-3
    config["scheduler"]["params"]["warmup_num_steps"] = 500
    with pytest.raises(PptkError) as err:
        fill_ds_config(config, layout=LAYOUT, precision="bf16", **RECIPE)
    assert str(err.value) == (
        "the DeepSpeed config disagrees with the recipe on 5 setting(s); remove each from the JSON "
        '(or set it to "auto") or pass the same value:\n'
        "  train_micro_batch_size_per_gpu: JSON 8, argument layout.micro_batch_size=2\n"
        "  zero_optimization.stage: JSON 0, argument layout.zero_stage=1\n"
        "  gradient_clipping: JSON 0.5, argument grad_clip=1.0\n"
        "  optimizer.params.lr: JSON 0.001, argument lr=0.0003\n"
        "  scheduler.params.warmup_num_steps: JSON 500, argument warmup_steps=10"
    )


def test_fill_reports_each_unfilled_auto_with_the_argument_that_fills_it():
    config = all_auto()
    config["zero_optimization"]["reduce_bucket_size"] = "auto"
    config["scheduler"]["params"]["total_num_steps"] = "auto"
    config["data_types"] = {"keep_in_fp32_modules": "auto"}  # DeepSpeed resolves this one itself
    with pytest.raises(PptkError) as err:
        fill_ds_config(config, layout=LAYOUT, lr=3e-4)
    assert str(err.value) == (
        'the DeepSpeed config has 6 "auto" value(s) nothing filled:\n'
        "  gradient_clipping: pass grad_clip=...\n"
        "  bf16.enabled: pass precision=...\n"
        "  zero_optimization.reduce_bucket_size: no pptk argument fills it; write a concrete value in the JSON\n"
        "  optimizer.params.weight_decay: pass weight_decay=...\n"
        "  scheduler.params.warmup_num_steps: pass warmup_steps=...\n"
        "  scheduler.params.total_num_steps: pass total_steps=..."
    )


def test_fill_reports_disagreements_and_unfilled_autos_together():
    config = all_auto() | {"gradient_accumulation_steps": 3}
    config["scheduler"]["params"]["total_num_steps"] = "auto"
    with pytest.raises(PptkError) as err:
        fill_ds_config(config, layout=LAYOUT, precision="bf16", **(RECIPE | {"total_steps": None}))
    message = str(err.value)
    assert "gradient_accumulation_steps: JSON 3, argument layout.grad_accum_steps=4" in message
    assert "scheduler.params.total_num_steps: pass total_steps=..." in message


def test_fill_precision_disagreement_names_the_matching_config():
    config = load_ds_config(shipped_config("bf16"))
    with pytest.raises(PptkError) as err:
        fill_ds_config(config, layout=LAYOUT, precision="fp16", **RECIPE)
    assert (
        "bf16.enabled / fp16.enabled: JSON trains in bf16, argument precision='fp16' "
        "(or use ds_configs/pipe_zero1_fp16.json)"
    ) in str(err.value)


def test_fill_rejects_unknown_precision_and_zero_warmup():
    with pytest.raises(PptkError, match="precision must be one of fp32, bf16, fp16, got 'fp8'"):
        fill_ds_config({}, layout=LAYOUT, precision="fp8")
    with pytest.raises(PptkError, match="warmup_steps must be >= 1 for DeepSpeed's Warmup\\* schedulers, got 0"):
        fill_ds_config({}, layout=LAYOUT, warmup_steps=0)


# --- precision_of ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, "fp32"),
        ({"bf16": {"enabled": False}, "fp16": {"enabled": False}}, "fp32"),
        ({"bf16": {"enabled": True}}, "bf16"),
        ({"bfloat16": {"enabled": True}}, "bf16"),
        ({"fp16": {"enabled": True, "loss_scale": 0}}, "fp16"),
    ],
)
def test_precision_of(config, expected):
    assert precision_of(config) == expected


def test_precision_of_rejects_auto_and_both():
    with pytest.raises(PptkError, match='fp16.enabled is "auto"; fill it with fill_ds_config'):
        precision_of({"fp16": {"enabled": "auto"}})
    with pytest.raises(PptkError, match="bf16.enabled and fp16.enabled are both true"):
        precision_of({"fp16": {"enabled": True}, "bf16": {"enabled": True}})


# --- the shipped configs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED_NAMES)
def test_shipped_config_fills_cleanly(name):
    config = fill_ds_config(load_ds_config(shipped_config(name)), layout=LAYOUT, **RECIPE)
    assert config["train_batch_size"] == 16
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 1.0
    assert config["zero_optimization"] == {"stage": 1}
    assert config["optimizer"]["type"] == "AdamW"
    assert config["optimizer"]["params"] | {"torch_adam": None} == {
        "lr": 3e-4,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "weight_decay": 0.1,
        "torch_adam": None,
    }
    assert config["scheduler"] == {
        "type": "WarmupDecayLR",
        "params": {
            "warmup_min_lr": 0.0,
            "warmup_max_lr": 3e-4,
            "warmup_num_steps": 10,
            "total_num_steps": 100,
            "warmup_type": "linear",
        },
    }
    assert (
        precision_of(config)
        == {"pipe_zero1_bf16.json": "bf16", "pipe_zero1_cpu.json": "fp32", "pipe_zero1_fp16.json": "fp16"}[name]
    )
    # Validates for the GPUs it is meant for, whatever this machine has.
    validate_ds_config(config, layout=LAYOUT, accelerator="cuda")


def test_cpu_config_validates_here_and_uses_torch_adamw():
    config = fill_ds_config(load_ds_config(shipped_config("fp32")), layout=LAYOUT, **RECIPE)
    validate_ds_config(config, layout=LAYOUT)
    assert config["optimizer"]["params"]["torch_adam"] is True


def test_the_bf16_config_validates_on_this_machine():
    config = fill_ds_config(load_ds_config(shipped_config("bf16")), layout=LAYOUT, **RECIPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the slow-CPU warning, tested above
        validate_ds_config(config, layout=LAYOUT)


@pytest.mark.parametrize("name", SHIPPED_NAMES)
def test_shipped_config_parses_in_deepspeed(name):
    # DeepSpeed's own parser (pydantic sections forbid unknown keys); with no process group its world size is 1.
    from deepspeed.runtime.config import DeepSpeedConfig

    layout = Layout(pp=2, dp=1, micro_batch_size=2, grad_accum_steps=4)
    config = fill_ds_config(load_ds_config(shipped_config(name)), layout=layout, **RECIPE)
    parsed = DeepSpeedConfig(config)
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (
        8,
        2,
        4,
    )
    assert parsed.zero_optimization_stage == 1
    assert (parsed.bfloat16_config.enabled, parsed.float16_config.enabled) == {
        "pipe_zero1_bf16.json": (True, False),
        "pipe_zero1_cpu.json": (False, False),
        "pipe_zero1_fp16.json": (False, True),
    }[name]
    assert parsed.optimizer_name == "adamw"
    assert parsed.scheduler_name == "WarmupDecayLR"
    assert parsed.gradient_clipping == 1.0
    assert parsed.wall_clock_breakdown is False


@pytest.mark.parametrize("name", SHIPPED_NAMES)
def test_shipped_config_top_level_keys_are_deepspeed_keys(name):
    from deepspeed.runtime import constants
    from deepspeed.runtime.precision_config import BFLOAT16, FP16
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    known = {v for v in vars(constants).values() if isinstance(v, str)} | {BFLOAT16, FP16, ZERO_OPTIMIZATION}
    config = json.loads(shipped_config(name).read_text())
    assert set(config) <= known, set(config) - known


@pytest.mark.parametrize("name", SHIPPED_NAMES)
def test_shipped_optimizer_and_scheduler_params_construct(name):
    # The filled params are the keyword arguments DeepSpeed passes; build the same objects it would on CPU.
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    config = fill_ds_config(load_ds_config(shipped_config(name)), layout=LAYOUT, **RECIPE)
    params = {k: v for k, v in config["optimizer"]["params"].items() if k != "torch_adam"}
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], **params)
    scheduler = WarmupDecayLR(optimizer, **config["scheduler"]["params"])
    lrs = []
    for _ in range(101):
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    # Linear warmup over 10 steps to lr, then linear decay to 0 at step 100.
    assert lrs[:3] == [0.0, pytest.approx(3e-5), pytest.approx(6e-5)]
    assert lrs[10] == pytest.approx(3e-4)
    assert lrs[55] == pytest.approx(1.5e-4)
    assert lrs[100] == 0.0
