# DeepSpeed internals of its optimizer wrappers: per-parameter Adam state, master weights, fp16 loss scaling.
from __future__ import annotations

import torch

from pptk.errors import PptkError

ADAM_STATES = ("exp_avg", "exp_avg_sq")


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
