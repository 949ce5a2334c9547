# Every DeepSpeed optimizer wrapper through pptk.deepspeed_compat on real engines: train, save, resume (same layout
# and another), with all the wrappers sharing one launch of 2 gloo ranks.
"""Per wrapper, on a tiny GPT-2 (tied embedding across the two stages):

  A  pp=2 x dp=1: 3 steps, pptk checkpoint, 2 more steps
  B  pp=2 x dp=1 resumed from it (DeepSpeed's own loader, or pptk's where DeepSpeed's cannot): A's last 2 losses,
     bit for bit
  C  pp=1 x dp=2 resumed from it (pptk's per-layer states, re-sharded): the restored fp32 weights and Adam moments
     equal the saved ones bit for bit, and the 2 losses continue A's curve; then one step with a NaN loss, which
     the wrapper skips (or, torch's optimizer, applies) as pptk's guard reads it

fp16: the shipped fp16 config through DeepSpeed where its CPU accelerator allows it (see
``test_fp16_where_the_cpu_accelerator_allows_it``). Elsewhere the fp16 wrappers (ZeRO-1's DeepSpeedZeroOptimizer and
ZeRO-0's FP16_UnfusedOptimizer) are built directly, as the engine builds them from the shipped fp16 config (building
them needs no fp16 arithmetic), to check the state plumbing and the loss-scale state a checkpoint carries.
"""

import json
import math

import pytest
import torch

from pptk.launch.ranks import run_ranks
from pptk.training.ds_config import cpu_supports

pytestmark = pytest.mark.dist

STEPS = 3  # before the checkpoint; the shipped warmup gives the first two steps lr 0, the third moves the weights
AFTER = 2
# name -> (shipped config, ZeRO stage, keep data_types.grad_accum_dtype, the wrapper DeepSpeed must pick)
CASES = {
    "fp32-zero1": ("fp32", 1, True, "DeepSpeedZeroOptimizer"),
    "fp32-zero0": ("fp32", 0, True, "torch"),
    "bf16-zero1": ("bf16", 1, True, "BF16_Optimizer"),  # the shipped bf16 config: fp32 gradient accumulation
    "bf16-zero0": ("bf16", 0, False, "BF16_Optimizer"),  # bf16 accumulation: BF16_Optimizer without ZeRO
    "bf16-accum-zero1": ("bf16", 1, False, "DeepSpeedZeroOptimizer"),  # the fp16 config's wrapper, in bf16
}
FP16_CASE = ("fp16", 1, True, "DeepSpeedZeroOptimizer")


def _config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=128, n_positions=16, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)


def _batches(*, dp_rank: int, dp: int, accum: int):
    """Every step's global batch is the same 4 micro-batches, whatever the layout (so the loss must fall)."""
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 128, (2, 16), generator=gen) for _ in range(4)]
    while True:
        for a in range(accum):
            ids = data[a * dp + dp_rank]
            yield (ids, torch.ones_like(ids)), ids


def _engine(case: tuple, *, pp: int, dp: int):
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from pptk import deepspeed_compat as compat
    from pptk.parallel.layout import Layout
    from pptk.parallel.pipeline import build_pipeline_module, plan_pipeline
    from pptk.training.ds_config import fill_ds_config, load_ds_config, shipped_config

    precision, zero, keep_accum_dtype, _ = case
    layout = Layout(pp=pp, dp=dp, micro_batch_size=2, grad_accum_steps=4 // dp, zero_stage=zero)
    raw = load_ds_config(shipped_config(precision))
    raw["zero_optimization"]["stage"] = "auto"  # filled from the layout
    if not keep_accum_dtype:
        raw.pop("data_types", None)
    config = fill_ds_config(
        raw, layout=layout, lr=3e-3, weight_decay=0.01, warmup_steps=2, total_steps=20, grad_clip=1.0
    )
    plan = plan_pipeline(_config(), num_stages=pp, dropout=False)
    module = build_pipeline_module(plan, topology=PipeDataParallelTopology(num_pp=pp, num_dp=dp))
    engine, *_ = deepspeed.initialize(model=module, model_parameters=list(module.parameters()), config=config)
    compat.after_initialize(engine)  # what the trainer does
    return engine, plan, layout


def _run_case(name: str, case: tuple, work) -> dict:
    import torch.distributed as dist

    from pptk import deepspeed_compat as compat
    from pptk.checkpoints.training import resume, save_checkpoint

    out = {}
    engine, plan, layout = _engine(case, pp=2, dp=1)
    out["wrapper"] = compat.optimizer_wrapper(engine.optimizer)
    calls = []
    original = compat.swap_loss_fn(engine, lambda outputs, labels: calls.append(1) or original(outputs, labels))
    batches = _batches(dp_rank=0, dp=1, accum=4)
    out["A"] = [float(engine.train_batch(batches)) for _ in range(STEPS)]
    out["loss_fn_calls"] = len(calls) if engine.is_last_stage() else None
    # the logits of the last stage's forwards, which DeepSpeed's pipe buffers would keep (release_loss_stage_outputs)
    out["outputs_held"] = [o is not None for o in engine.pipe_buffers["outputs"]] if engine.is_last_stage() else None
    save_checkpoint(engine, plan, layout=layout, checkpoints_dir=work / name, step=STEPS)
    out["A"] += [float(engine.train_batch(batches)) for _ in range(AFTER)]

    engine, plan, layout = _engine(case, pp=2, dp=1)
    resume(engine, plan, layout=layout, path=work / name)
    batches = _batches(dp_rank=0, dp=1, accum=4)
    out["B"] = [float(engine.train_batch(batches)) for _ in range(AFTER)]

    engine, plan, layout = _engine(case, pp=1, dp=2)
    resume(engine, plan, layout=layout, path=work / name)
    out["C_progress"] = list(compat.training_progress(engine))
    out["C_step_count"] = compat.optimizer_step_count(engine.optimizer)
    saved = {
        i: torch.load(work / name / f"step{STEPS}" / f"optim_layer_{i:02d}.pt")
        for i in range(len(plan.layers))
        if (work / name / f"step{STEPS}" / f"optim_layer_{i:02d}.pt").is_file()
    }
    mismatches = []
    from pptk.parallel.pipeline import local_layers

    for index, layer_module in local_layers(engine.module, plan.layers):
        for pname, param in layer_module.named_parameters():
            for key, value in saved[index][pname].items():
                if not torch.equal(compat.get_param_state(engine.optimizer, param, key), value):
                    mismatches.append(f"layer {index} {pname} {key}")
    out["C_state_mismatches"] = mismatches
    batches = _batches(dp_rank=engine.grid.get_data_parallel_rank(), dp=2, accum=2)
    out["C"] = [float(engine.train_batch(batches)) for _ in range(AFTER)]
    out["nan_step"] = _nan_loss_step(engine, batches)
    out["manifest"] = json.loads((work / name / f"step{STEPS}" / "pptk.json").read_text())
    dist.barrier()
    return out


def _nan_loss_step(engine, batches) -> dict:
    """One step whose loss is NaN (as the trainer's nanloss failpoint makes it): whether DeepSpeed skipped the update,
    as pptk's guard reads it, and whether the weights stayed finite."""
    from pptk import deepspeed_compat as compat

    skipped = compat.skipped_optimizer_steps(engine)
    loss_fn = engine.module.loss_fn
    compat.swap_loss_fn(engine, lambda outputs, labels: loss_fn(outputs, labels) * float("nan"))
    loss = float(engine.train_batch(batches))
    return {
        "loss": loss,
        "skipped": compat.skipped_optimizer_steps(engine) - skipped,
        "weights_finite": all(bool(p.isfinite().all()) for p in engine.module.parameters()),
    }


def _fp16_wrappers_built_alone() -> dict:
    """DeepSpeed's fp16 ZeRO-1 wrapper around AdamW, built as the engine builds it from the shipped fp16 config
    (constructing it needs no fp16 arithmetic), then driven through pptk's state plumbing and loss-scale state."""
    import torch.distributed as dist
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils.timer import NoopTimer

    from pptk import deepspeed_compat as compat
    from pptk.parallel.layout import Layout
    from pptk.training.ds_config import fill_ds_config, load_ds_config, shipped_config

    layout = Layout(pp=1, dp=2, micro_batch_size=2, grad_accum_steps=2)
    config = DeepSpeedConfig(
        fill_ds_config(
            load_ds_config(shipped_config("fp16")),
            layout=layout,
            lr=1e-3,
            weight_decay=0.0,
            warmup_steps=1,
            total_steps=10,
            grad_clip=1.0,
        )
    )
    scaling = config.float16_config.dynamic_loss_scale_args()

    def build(params):
        return DeepSpeedZeroOptimizer(
            torch.optim.AdamW(params, lr=1e-3),
            {p: f"p{i}" for i, p in enumerate(params)},
            NoopTimer(),
            {},
            dynamic_loss_scale=True,
            dynamic_loss_args=scaling,
            dp_process_group=dist.group.WORLD,
            partition_grads=False,
        )

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(37, 5).half()), torch.nn.Parameter(torch.randn(11).half())]
    optimizer = build(params)
    for overflow in (True, True, False):  # hysteresis 2: the second overflow halves the scale
        optimizer.loss_scaler.update_scale(overflow)
    compat.materialise_optimizer_states(optimizer)
    values = {
        key: [torch.full(p.shape, v, dtype=torch.float32) for p in params]
        for key, v in (("fp32", 0.25), ("exp_avg", -1.5), ("exp_avg_sq", 3.0))
    }
    for key, tensors in values.items():
        for p, value in zip(params, tensors):
            compat.set_param_state(optimizer, p, key, value)
    round_trip = all(
        torch.equal(compat.get_param_state(optimizer, p, key), value)
        for key, tensors in values.items()
        for p, value in zip(params, tensors)
    )
    state = compat.loss_scale_state(optimizer)
    fresh = build([torch.nn.Parameter(p.detach().clone()) for p in params])
    before = compat.loss_scale_state(fresh)
    compat.set_loss_scale_state(fresh, json.loads(json.dumps(state)))  # as the manifest stores it
    # fp16 without ZeRO: FP16_UnfusedOptimizer (torch AdamW inside) keeps its scale in a LossScaleConfig instead
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    def build_unfused():
        params = [torch.nn.Parameter(torch.randn(8, 4).half())]
        return FP16_UnfusedOptimizer(
            torch.optim.AdamW(params, lr=1e-3), dynamic_loss_scale=True, dynamic_loss_args=scaling, verbose=False
        )

    unfused = build_unfused()
    for overflow in (True, False):
        unfused._update_scale(overflow)
    unfused_state = compat.loss_scale_state(unfused)
    unfused_fresh = build_unfused()
    compat.set_loss_scale_state(unfused_fresh, json.loads(json.dumps(unfused_state)))
    return {
        "wrapper": compat.optimizer_wrapper(optimizer),
        "state_round_trip": round_trip,
        "loss_scale": state,
        "fresh_loss_scale": before,
        "restored_loss_scale": compat.loss_scale_state(fresh),
        "unfused_wrapper": compat.optimizer_wrapper(unfused),
        "unfused_loss_scale": unfused_state,
        "unfused_restored": compat.loss_scale_state(unfused_fresh),
    }


def _worker(rank: int, work: str, cases: dict, fp16_engine: bool) -> None:
    from pathlib import Path

    from pptk.training.engine import init_distributed

    init_distributed()
    work = Path(work)
    results = {name: _run_case(name, case, work) for name, case in cases.items()}
    results["fp16-built-alone"] = _fp16_wrappers_built_alone()
    if not fp16_engine:  # the CPU accelerator must refuse fp16 itself, the way pptk's validation says it will
        try:
            _engine(FP16_CASE, pp=2, dp=1)
            results["fp16-engine-error"] = None
        except ValueError as err:
            results["fp16-engine-error"] = str(err)
    torch.save(results, work / f"results{rank}.pt")


@pytest.fixture(scope="module")
def wrapper_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("wrappers")
    fp16_engine = cpu_supports("fp16")
    cases = dict(CASES) | ({"fp16-zero1": FP16_CASE} if fp16_engine else {})
    run_ranks(_worker, world_size=2, args=(str(work), cases, fp16_engine), log_dir=work / "logs")
    return [torch.load(work / f"results{r}.pt") for r in range(2)]


@pytest.mark.parametrize("name", list(CASES))
def test_wrapper_trains_saves_and_resumes_on_both_layouts(wrapper_runs, name):
    _check_case(wrapper_runs, name, CASES[name])


def _check_case(runs, name, case):
    precision, _, _, wrapper = case
    first, last = runs[0][name], runs[1][name]  # rank 1 holds the last stage at pp=2
    assert first["wrapper"] == wrapper
    assert last["loss_fn_calls"] == 4 * STEPS, "swap_loss_fn: the last stage computes every micro-batch's loss"
    assert last["outputs_held"] and not any(last["outputs_held"]), "the last stage keeps no logits between steps"
    a = first["A"]
    assert all(torch.isfinite(torch.tensor(a))) and a[-1] < a[0], a
    assert first["B"] == a[STEPS:], f"same-layout resume must be exact: {a} vs {first['B']}"
    for run in (first, last):
        assert run["C_state_mismatches"] == [], run["C_state_mismatches"][:5]
        assert run["C_progress"] == [STEPS, STEPS * 8] and run["C_step_count"] == STEPS
    # The restored state is exact (above); the new layout only reorders the fp32 gradient reductions. In bf16 a
    # weight whose update lands next to a rounding boundary can then round the other way (2^-8 relative).
    rel = 1e-5 if precision == "fp32" else 2e-4
    assert first["C"] == pytest.approx(a[STEPS:], rel=rel), (a, first["C"])
    manifest = first["manifest"]
    assert manifest["optimizer_wrapper"] == wrapper and manifest["loss_scale"] is None
    # A NaN loss: every DeepSpeed wrapper sees the non-finite gradients and skips the update (so pptk's guard counts
    # a bad step and goes on); torch's own optimizer (fp32 at ZeRO-0) applies it (so the guard stops the run at once)
    skips = wrapper != "torch"
    for run in (first, last):
        nan_step = run["nan_step"]
        assert math.isnan(nan_step["loss"]), nan_step
        assert (nan_step["skipped"], nan_step["weights_finite"]) == (int(skips), skips), nan_step


def test_fp16_wrappers_state_and_loss_scale_round_trip(wrapper_runs):
    built = wrapper_runs[0]["fp16-built-alone"]
    assert built["wrapper"] == "DeepSpeedZeroOptimizer"
    assert built["state_round_trip"]
    scale = built["loss_scale"]
    # the shipped config: 2^16 to start, hysteresis 2 (the first overflow is forgiven, the second halves the scale)
    assert built["fresh_loss_scale"]["cur_scale"] == 2**16 and built["fresh_loss_scale"]["cur_hysteresis"] == 2
    assert scale["kind"] == "loss_scaler" and scale["dynamic"] and scale["cur_scale"] == 2**15
    assert (scale["cur_iter"], scale["last_overflow_iter"], scale["cur_hysteresis"]) == (3, 1, 1)
    assert built["restored_loss_scale"] == scale
    assert built["unfused_wrapper"] == "FP16_UnfusedOptimizer"
    unfused = built["unfused_loss_scale"]
    assert unfused["kind"] == "loss_scale_config" and unfused["dynamic_loss_scale"]
    assert (unfused["cur_scale"], unfused["last_overflow_iter"]) == (2**15, 0)
    assert built["unfused_restored"] == unfused


def test_fp16_where_the_cpu_accelerator_allows_it(wrapper_runs):
    if cpu_supports("fp16"):
        _check_case(wrapper_runs, "fp16-zero1", FP16_CASE)
    else:
        assert wrapper_runs[0]["fp16-engine-error"] == "Type fp16 is not supported on your device."
