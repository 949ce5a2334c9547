# DeepSpeed JSON configs: load them, fill "auto" values from the recipe, and reject bad combinations early.
"""The configs shipped in ds_configs/ (all ZeRO stage 1, AdamW betas (0.9, 0.95), WarmupDecayLR with linear warmup):

- pipe_zero1_bf16.json  Ampere or newer GPUs. bf16 weights with fp32 gradient accumulation
  (data_types.grad_accum_dtype): DeepSpeed then uses its BF16_Optimizer, which keeps fp32 master weights and
  shards the optimizer state across the dp replicas; the pipeline engine has a dedicated path for it.
  DeepSpeed's FusedAdam (a CUDA op, compiled on first use unless DeepSpeed was installed with DS_BUILD_FUSED_ADAM=1).
- pipe_zero1_fp16.json  V100-class GPUs without bf16: fp16 with dynamic loss scaling (loss_scale 0).
- pipe_zero1_cpu.json   CPU / gloo runs and tests: fp32, and "torch_adam": true so DeepSpeed builds
  torch.optim.AdamW instead of FusedAdam (which the CPU accelerator would JIT-compile as a C++ extension).

They ship inside the package (``pptk.ds_configs``, mapped from the repository's ds_configs/ in pyproject.toml)
and are found with importlib.resources, so an installed pptk (the Docker image) has them: `shipped_config`.
bf16 also runs on CPU ranks, through the same BF16_Optimizer as on GPUs (slowly without bf16 instructions);
fp16 runs on CPU only where DeepSpeed's CPU accelerator reports fp16 support (AVX512-FP16 / AMX-FP16).

Batch sizes, ZeRO stage, learning rate, weight decay, warmup/total steps and gradient clipping are "auto" or
owned by the recipe, so each has one source of truth: `fill_ds_config` writes them in and refuses any JSON value
that disagrees. DeepSpeed itself silently drops "auto" inside its pydantic sections (an unfilled
zero_optimization.stage "auto" would become stage 0), which is why an unfilled "auto" is an error here.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

from pptk.errors import PptkError
from pptk.parallel.layout import Layout

PRECISIONS = ("fp32", "bf16", "fp16")
SHIPPED = {"fp32": "pipe_zero1_cpu.json", "bf16": "pipe_zero1_bf16.json", "fp16": "pipe_zero1_fp16.json"}
AUTO = "auto"
# "auto" values DeepSpeed resolves itself; everything else left "auto" is a bug.
_NATIVE_AUTO = {"data_types.keep_in_fp32_modules", "pipeline.stages"}
_WARMUP_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
_TOTAL_STEP_SCHEDULERS = ("WarmupDecayLR", "WarmupCosineLR")
# WarmupCosineLR has no warmup_max_lr: it scales the optimizer's lr by ratios.
_MAX_LR_SCHEDULERS = ("WarmupLR", "WarmupDecayLR")
_PRECISION_KEYS = {"bf16.enabled": "bf16", "fp16.enabled": "fp16"}
_MISSING = object()
# With tp > 1 the pipeline engine would by default split the activations it sends between stages over the tp ranks
# (and gather them on arrival); pptk sends them whole between matching tp ranks, the plain Megatron layout.
TENSOR_PARALLEL_PIPELINE = {"pipe_partitioned": False, "grad_partitioned": False}


def load_ds_config(path_or_dict: str | Path | dict) -> dict:
    """A deep copy of a config dict, or the parsed JSON file (strict JSON: no comments, no duplicate keys)."""
    if isinstance(path_or_dict, dict):
        return copy.deepcopy(path_or_dict)
    path = Path(path_or_dict)
    if not path.is_file() and _shipped_name(str(path_or_dict)) is not None and path.parent.name in ("", "ds_configs"):
        # "bf16", "pipe_zero1_bf16.json" or ".../ds_configs/pipe_zero1_bf16.json" where there is no such folder (an
        # installed pptk, run outside the repository): the copy shipped in the package, same name, same content
        path = shipped_config(str(path_or_dict))
    if not path.is_file():
        shipped = ", ".join(sorted(SHIPPED.values()))
        raise PptkError(
            f"DeepSpeed config {str(path)!r} does not exist; pass a JSON file, or a shipped config by "
            f"name or precision ({', '.join(PRECISIONS)}): {shipped}"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise PptkError(
            f"{path} is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}; "
            "fix the file (JSON allows no comments and no trailing commas)"
        ) from None
    except _DuplicateKey as e:
        raise PptkError(f"{path} sets {e.args[0]!r} twice; keep one (DeepSpeed rejects duplicate keys)") from None
    if not isinstance(config, dict):
        raise PptkError(
            f"{path} holds a JSON {type(config).__name__}, not an object; a DeepSpeed config is "
            '{"train_micro_batch_size_per_gpu": ..., ...}'
        )
    return config


def shipped_config(name: str) -> Path:
    """The path of a config shipped with pptk, by precision ("bf16", "fp16", "fp32" or "cpu") or file name
    ("pipe_zero1_bf16.json", or a path ending in it such as ds_configs/pipe_zero1_bf16.json)."""
    file_name = _shipped_name(name)
    if file_name is None:
        raise PptkError(
            f"{name!r} is not a shipped DeepSpeed config; choose a precision ({', '.join(PRECISIONS)}) "
            f"or one of {', '.join(sorted(SHIPPED.values()))}"
        )
    return shipped_dir() / file_name


def shipped_dir() -> Path:
    """``pptk.ds_configs``: the repository's ds_configs/, which the install maps into the package. pptk run straight
    from a checkout (``PYTHONPATH=.``, no install, as on a machine without a package index) reads the folder itself."""
    try:
        return Path(str(resources.files("pptk.ds_configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "ds_configs"


def default_ds_config(accelerator: str | None = None) -> Path:
    """The shipped config a run uses without --ds-config: bf16 on GPUs, fp32 on CPU (DS_ACCELERATOR=cpu, no CUDA)."""
    return shipped_config("fp32" if (accelerator or _detect_accelerator()) == "cpu" else "bf16")


def _shipped_name(name: str) -> str | None:
    key = "fp32" if name == "cpu" else name
    if key in SHIPPED:
        return SHIPPED[key]
    base = Path(name).name
    return base if base in SHIPPED.values() else None


def fill_ds_config(
    config: dict,
    *,
    layout: Layout,
    lr: float | None = None,
    weight_decay: float | None = None,
    warmup_steps: int | None = None,
    total_steps: int | None = None,
    grad_clip: float | None = None,
    precision: str | None = None,
) -> dict:
    """A new config with every "auto" filled from the layout and the arguments.

    The recipe is the source of truth: a key the JSON leaves out is written from the argument (the batch keys and
    zero_optimization.stage always, from the layout); a concrete JSON value that differs from the argument is an
    error, and all such disagreements are reported at once. Optimizer and scheduler keys are only touched when
    the JSON has that section (without it the caller passes its own optimizer or scheduler).
    """
    if precision is not None and precision not in PRECISIONS:
        raise PptkError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if warmup_steps is not None and warmup_steps < 1:
        raise PptkError(f"warmup_steps must be >= 1 for DeepSpeed's Warmup* schedulers, got {warmup_steps}")
    config = copy.deepcopy(config)
    config.setdefault("zero_optimization", {})
    # (dotted key, argument name shown to the user, value or None when not passed)
    wanted: list[tuple[str, str, Any]] = [
        ("train_micro_batch_size_per_gpu", "layout.micro_batch_size", layout.micro_batch_size),
        ("gradient_accumulation_steps", "layout.grad_accum_steps", layout.grad_accum_steps),
        ("train_batch_size", "layout.global_batch_size", layout.global_batch_size),
        ("zero_optimization.stage", "layout.zero_stage", layout.zero_stage),
        ("gradient_clipping", "grad_clip", grad_clip),
        ("optimizer.params.lr", "lr", lr),
        ("optimizer.params.weight_decay", "weight_decay", weight_decay),
    ]
    scheduler_type = _get(config, "scheduler.type")
    if scheduler_type in _WARMUP_SCHEDULERS:
        wanted.append(("scheduler.params.warmup_num_steps", "warmup_steps", warmup_steps))
    if scheduler_type in _TOTAL_STEP_SCHEDULERS:
        wanted.append(("scheduler.params.total_num_steps", "total_steps", total_steps))
    if scheduler_type in _MAX_LR_SCHEDULERS:
        wanted.append(("scheduler.params.warmup_max_lr", "lr", lr))

    disagreements = []
    for key, arg_name, value in wanted:
        # Without a value an "auto" stays, and is reported below naming arg_name.
        if value is None or not _has_parent(config, key):
            continue
        current = _get(config, key, _MISSING)
        if current is _MISSING or current == AUTO:
            _set(config, key, value)
        elif current != value:
            disagreements.append(f"{key}: JSON {current!r}, argument {arg_name}={value!r}")
    if layout.tp > 1:
        section = config.setdefault("pipeline", {})
        for key, value in TENSOR_PARALLEL_PIPELINE.items():
            if section.setdefault(key, value) != value:
                disagreements.append(f"pipeline.{key}: JSON {section[key]!r}, tp({layout.tp}) > 1 needs {value!r}")
    if precision is not None:
        for key, name in _PRECISION_KEYS.items():
            if _get(config, key) == AUTO:
                _set(config, key, precision == name)
        have = precision_of(config)
        if have != precision:
            disagreements.append(
                f"bf16.enabled / fp16.enabled: JSON trains in {have}, argument precision="
                f"{precision!r} (or use ds_configs/{SHIPPED[precision]})"
            )

    fillers = {key: arg_name for key, arg_name, _ in wanted}
    fillers.update(dict.fromkeys(_PRECISION_KEYS, "precision"))
    unfilled = [
        f"{key}: pass {fillers[key]}=..."
        if key in fillers
        else f"{key}: no pptk argument fills it; write a concrete value in the JSON"
        for key in _auto_keys(config)
    ]
    problems = []
    if disagreements:
        problems.append(
            f"the DeepSpeed config disagrees with the recipe on {len(disagreements)} setting(s); "
            'remove each from the JSON (or set it to "auto") or pass the same value:\n  ' + "\n  ".join(disagreements)
        )
    if unfilled:
        problems.append(
            f'the DeepSpeed config has {len(unfilled)} "auto" value(s) nothing filled:\n  ' + "\n  ".join(unfilled)
        )
    if problems:
        raise PptkError("\n".join(problems))
    return config


def validate_ds_config(config: dict, *, layout: Layout, accelerator: str | None = None) -> None:
    """Reject configs DeepSpeed's pipeline engine would fail on (or fail late on), listing every problem.

    accelerator: "cuda", "cpu" or another DeepSpeed accelerator name; None detects this machine (DS_ACCELERATOR,
    then torch.cuda.is_available()). Pass "cuda" to check a GPU config from a machine without one.
    """
    problems = [f'{key} is still "auto"; fill it with fill_ds_config first' for key in _auto_keys(config)]
    stage = _get(config, "zero_optimization.stage", 0)
    zero = config.get("zero_optimization")
    zero = zero if isinstance(zero, dict) else {}
    if stage not in (AUTO, layout.zero_stage):
        problems.append(f"zero_optimization.stage {stage!r} != layout zero_stage {layout.zero_stage}")
    if layout.pp > 1 and isinstance(stage, int) and stage >= 2:
        problems.append(
            f"zero_optimization.stage {stage} with pp({layout.pp}) > 1: DeepSpeed's pipeline engine "
            "supports ZeRO stage 0 or 1 only; use stage 1 (optimizer-state sharding across the dp "
            "replicas) or pp=1"
        )
    offloads = [
        k for k in ("offload_optimizer", "offload_param", "cpu_offload", "cpu_offload_param") if _offloads(zero.get(k))
    ]
    if layout.pp > 1 and offloads:
        problems.append(
            f"zero_optimization.{' and .'.join(offloads)} with pp({layout.pp}) > 1: pptk does not "
            "offload with pipelines (DeepSpeed's pipeline engine breaks with it, e.g. bf16 + "
            "offload_optimizer, deepspeedai/DeepSpeed#3866); remove the offload section or use pp=1"
        )
    bf16, fp16 = _enabled(config, "bf16"), _enabled(config, "fp16")
    if bf16 and fp16:
        problems.append("bf16.enabled and fp16.enabled are both true; enable one (DeepSpeed refuses both)")
    accelerator = accelerator or _detect_accelerator()
    if fp16 and accelerator == "cpu" and not cpu_supports("fp16"):
        problems.append(
            f"fp16 is enabled but this run is on CPU (DS_ACCELERATOR="
            f"{os.environ.get('DS_ACCELERATOR', '')!r}, CUDA available: {_cuda_available()}) and "
            "DeepSpeed's CPU accelerator supports fp16 only "
            "on CPUs with AVX512-FP16/AMX-FP16, which this one lacks; use bf16 "
            f"({shipped_config('bf16')}) or fp32 ({shipped_config('fp32')})"
        )
    if bf16 and accelerator == "cpu" and not cpu_supports("bf16"):
        warnings.warn(
            "bf16 on CPU ranks runs through DeepSpeed's BF16_Optimizer as on GPUs, but this CPU has no bf16 "
            "instructions (AVX512-BF16/AMX): expect several times the fp32 step time; use "
            f"{shipped_config('fp32')} for speed on CPU",
            stacklevel=2,
        )
    if fp16 and stage == 0:
        problems.append(
            "fp16 with zero_optimization.stage 0 runs through DeepSpeed's FP16_Optimizer, whose optimizer "
            "state pptk cannot checkpoint per layer (for resuming on another layout); use stage 1, as "
            "ds_configs/pipe_zero1_fp16.json does"
        )
    if bf16 and _get(config, "data_types.grad_accum_dtype") not in (None, "bf16") and stage == 0:
        problems.append(
            "bf16 with data_types.grad_accum_dtype fp32 needs zero_optimization.stage 1 (DeepSpeed's "
            "BF16_Optimizer); use stage 1 or remove data_types.grad_accum_dtype"
        )
    problems += _batch_problems(config, layout=layout)
    if problems:
        raise PptkError("the DeepSpeed config does not fit this run:\n  " + "\n  ".join(problems))


def precision_of(config: dict) -> str:
    """ "fp32", "bf16" or "fp16": what DeepSpeed will train in with this config."""
    for key in _PRECISION_KEYS:
        if _get(config, key) == AUTO:
            raise PptkError(f'{key} is "auto"; fill it with fill_ds_config(precision=...) first')
    bf16, fp16 = _enabled(config, "bf16"), _enabled(config, "fp16")
    if bf16 and fp16:
        raise PptkError("bf16.enabled and fp16.enabled are both true; enable one (DeepSpeed refuses both)")
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def _batch_problems(config: dict, *, layout: Layout) -> list[str]:
    micro = config.get("train_micro_batch_size_per_gpu")
    accum = config.get("gradient_accumulation_steps")
    total = config.get("train_batch_size")
    problems = []
    for key, value, want, name in (
        ("train_micro_batch_size_per_gpu", micro, layout.micro_batch_size, "micro_batch_size"),
        ("gradient_accumulation_steps", accum, layout.grad_accum_steps, "grad_accum_steps"),
    ):
        if value is not None and value != want:
            problems.append(f"{key}({value}) != layout {name}({want})")
    if (
        isinstance(micro, int)
        and isinstance(accum, int)
        and isinstance(total, int)
        and total != micro * accum * layout.dp
    ):
        problems.append(
            f"train_batch_size({total}) != train_micro_batch_size_per_gpu({micro}) * "
            f"gradient_accumulation_steps({accum}) * dp({layout.dp}) = {micro * accum * layout.dp}"
        )
    return problems


def _detect_accelerator() -> str:
    name = os.environ.get("DS_ACCELERATOR", "")
    if name:
        return name
    return "cuda" if _cuda_available() else "cpu"


def _cuda_available() -> bool:
    import torch  # imported late: reading and filling configs needs no torch

    return torch.cuda.is_available()


def cpu_supports(precision: str) -> bool:
    """Whether DeepSpeed's CPU accelerator runs ``precision`` at speed on this CPU; DeepSpeed 0.19.8's
    CpuAccelerator.is_fp16_supported asks oneDNN the same question (it always accepts bf16, fast or not)."""
    import torch

    probe = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}.get(precision)
    if probe is None:
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return False


def _enabled(config: dict, section: str) -> bool:
    # "bfloat16" is DeepSpeed's older spelling of the bf16 section.
    block = config.get(section)
    if block is None and section == "bf16":
        block = config.get("bfloat16")
    return isinstance(block, dict) and block.get("enabled") is True


def _offloads(value: Any) -> bool:
    if isinstance(value, dict):
        return value.get("device", "none") != "none"
    return value is True


def _auto_keys(config: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in config.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            keys += _auto_keys(value, f"{key}.")
        elif value == AUTO and key not in _NATIVE_AUTO:
            keys.append(key)
    return keys


def _get(config: dict, key: str, default: Any = None) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _has_parent(config: dict, key: str) -> bool:
    *parents, _ = key.split(".")
    node: Any = config
    for part in parents:
        if not isinstance(node, dict) or not isinstance(node.get(part), dict):
            # A missing "params" under a present optimizer/scheduler is created; a missing section is not.
            return part == "params" and isinstance(node, dict)
        node = node[part]
    return True


def _set(config: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result
