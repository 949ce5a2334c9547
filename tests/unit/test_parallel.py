# Layout: derived sizes, from_world arithmetic, and every validation error with its numbers.
import dataclasses
import re

import pytest

from pptk.errors import PptkError
from pptk.parallel.layout import Layout, Range, layout_problems


def test_derived_sizes():
    layout = Layout(pp=2, dp=3, micro_batch_size=4, grad_accum_steps=8)
    assert layout.zero_stage == 1
    assert layout.world_size == 6
    assert layout.global_batch_size == 96
    assert layout.bubble_fraction == pytest.approx(1 / 9)


def test_frozen_and_keyword_only():
    layout = Layout(pp=1, dp=1, micro_batch_size=1, grad_accum_steps=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.pp = 2
    with pytest.raises(TypeError):
        Layout(1, 1, 1, 1)


def test_describe():
    layout = Layout(pp=2, dp=2, micro_batch_size=2, grad_accum_steps=4)
    assert layout.describe() == (
        "pp(2) x dp(2) = WORLD_SIZE(4); global batch 16 = micro_batch 2 x grad_accum 4 x dp 2; ZeRO-1; "
        "pipeline bubble ~20%"
    )
    assert Layout(pp=1, dp=4, micro_batch_size=8, grad_accum_steps=1, zero_stage=2).describe() == (
        "pp(1) x dp(4) = WORLD_SIZE(4); global batch 32 = micro_batch 8 x grad_accum 1 x dp 4; ZeRO-2"
    )


def test_every_non_positive_field_is_reported_at_once():
    with pytest.raises(PptkError) as err:
        Layout(pp=0, dp=-1, micro_batch_size=2, grad_accum_steps=0)
    assert str(err.value) == (
        "invalid parallel layout: --pp must be an integer >= 1, got 0; --dp must be an integer >= 1, got -1; "
        "--grad-accum-steps must be an integer >= 1, got 0"
    )


@pytest.mark.parametrize("bad", [True, 2.0, "2", float("nan")])
def test_non_integers_are_rejected(bad):
    with pytest.raises(PptkError, match=re.escape(f"--micro-batch-size must be an integer >= 1, got {bad!r}")):
        Layout(pp=1, dp=1, micro_batch_size=bad, grad_accum_steps=1)


@pytest.mark.parametrize("stage", [-1, 4])
def test_zero_stage_out_of_range(stage):
    with pytest.raises(PptkError, match=f"--zero-stage must be an integer from 0 to 3, got {stage}"):
        Layout(pp=1, dp=2, micro_batch_size=1, grad_accum_steps=1, zero_stage=stage)


@pytest.mark.parametrize("tp", [-2, 0])
def test_a_negative_or_zero_tp_is_refused_not_multiplied_into_the_world_size(tp):
    with pytest.raises(PptkError, match=f"--tp must be an integer >= 1, got {tp}"):
        Layout(pp=2, tp=tp, dp=1, micro_batch_size=1, grad_accum_steps=4)
    with pytest.raises(PptkError, match=f"--tp must be an integer >= 1, got {tp}"):
        Layout.from_world(world_size=4, pp=2, tp=tp, micro_batch_size=1, grad_accum_steps=4)


def test_dualpipev_with_tensor_parallelism_is_refused():
    with pytest.raises(PptkError, match="--schedule dualpipev with --tp 2 is not supported yet"):
        Layout(pp=2, tp=2, dp=1, micro_batch_size=1, grad_accum_steps=4, schedule="dualpipev")


def test_layout_problems_checks_what_is_known():
    # dp, grad_accum_steps and zero_stage come later in a recipe (WORLD_SIZE, a global batch, the DeepSpeed JSON)
    assert layout_problems(pp=2, tp=2, micro_batch_size=4) == []
    assert layout_problems(pp=2, zero_stage=2) == [
        "--zero-stage 2 with --pp 2: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only; use --zero-stage 1 "
        "(optimizer-state sharding across the dp replicas) or --pp 1"
    ]
    # a bad number is reported alone: the rules between numbers need valid ones
    assert layout_problems(pp=0, tp=2, schedule="dualpipev") == ["--pp must be an integer >= 1, got 0"]


@pytest.mark.parametrize(
    ("bound", "value", "message"),
    [
        (Range("--lr", 0, integer=False, low_excluded=True), float("nan"), "--lr must be a finite number > 0, got nan"),
        (Range("--lr", 0, integer=False, low_excluded=True), float("inf"), "--lr must be a finite number > 0, got inf"),
        (Range("--lr", 0, integer=False, low_excluded=True), 0.0, "--lr must be a finite number > 0, got 0.0"),
        (Range("--grad-clip", 0, integer=False), -1.0, "--grad-clip must be a finite number >= 0, got -1.0"),
        (
            Range("--loss-spike-factor", 1, integer=False, low_excluded=True, off=0),
            0.5,
            "--loss-spike-factor must be a finite number > 1, or 0 (off), got 0.5",
        ),
        (Range("--seed", 0, 9), 10, "--seed must be an integer from 0 to 9, got 10"),
    ],
)
def test_a_range_names_the_flag_the_value_and_what_it_accepts(bound, value, message):
    assert bound.problem(value) is not None and bound.problem(value).startswith(message)


def test_a_range_accepts_its_ends_and_its_off_value():
    assert Range("--seed", 0, 9).problem(0) is None and Range("--seed", 0, 9).problem(9) is None
    assert Range("--grad-clip", 0, integer=False).problem(0) is None
    spike = Range("--loss-spike-factor", 1, integer=False, low_excluded=True, off=0)
    assert spike.problem(0) is None and spike.problem(1.5) is None and spike.problem(1) is not None


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2_and_3_rejected_with_pipelines(stage):
    with pytest.raises(PptkError) as err:
        Layout(pp=2, dp=2, micro_batch_size=1, grad_accum_steps=4, zero_stage=stage)
    assert f"--zero-stage {stage} with --pp 2" in str(err.value)
    assert "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only; use --zero-stage 1" in str(err.value)
    assert "or --pp 1" in str(err.value)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_any_zero_stage_without_pipelining(stage):
    assert Layout(pp=1, dp=2, micro_batch_size=1, grad_accum_steps=1, zero_stage=stage).zero_stage == stage


def test_from_world_with_grad_accum():
    layout = Layout.from_world(world_size=8, pp=2, micro_batch_size=4, grad_accum_steps=6, zero_stage=0)
    assert layout == Layout(pp=2, dp=4, micro_batch_size=4, grad_accum_steps=6, zero_stage=0)


def test_from_world_derives_grad_accum_from_global_batch():
    layout = Layout.from_world(world_size=6, pp=2, micro_batch_size=4, global_batch_size=96)
    assert (layout.dp, layout.grad_accum_steps, layout.global_batch_size) == (3, 8, 96)


def test_from_world_accepts_consistent_accum_and_global_batch():
    layout = Layout.from_world(world_size=4, pp=2, micro_batch_size=2, grad_accum_steps=4, global_batch_size=16)
    assert layout.grad_accum_steps == 4


def test_from_world_rejects_inconsistent_accum_and_global_batch():
    with pytest.raises(PptkError) as err:
        Layout.from_world(world_size=4, pp=2, micro_batch_size=2, grad_accum_steps=3, global_batch_size=16)
    assert str(err.value) == (
        "grad_accum_steps(3) disagrees with global_batch_size(16) = micro_batch_size(2) * grad_accum_steps(4) "
        "* dp(2); pass only one of them"
    )


def test_from_world_pp_must_divide_world_size():
    with pytest.raises(PptkError) as err:
        Layout.from_world(world_size=12, pp=5, micro_batch_size=1, grad_accum_steps=1)
    message = str(err.value)
    assert message.startswith("pp(5) does not divide WORLD_SIZE(12)")
    assert "for WORLD_SIZE 12 use --pp 1, 2, 3, 4, 6, 12" in message


def test_from_world_pp_larger_than_world_size():
    with pytest.raises(PptkError, match=r"pp\(4\) does not divide WORLD_SIZE\(2\).*use --pp 1, 2,"):
        Layout.from_world(world_size=2, pp=4, micro_batch_size=1, grad_accum_steps=1)


def test_from_world_global_batch_not_divisible_shows_arithmetic_and_nearest():
    with pytest.raises(PptkError) as err:
        Layout.from_world(world_size=6, pp=2, micro_batch_size=4, global_batch_size=100)
    assert str(err.value) == (
        "global_batch_size(100) is not a multiple of micro_batch_size(4) * dp(3) = 12: 100 / 12 = 8.33 "
        "micro-batches per step; use global_batch_size 96 (grad_accum_steps 8) or 108 (grad_accum_steps 9), "
        "or change micro_batch_size"
    )


def test_from_world_global_batch_below_one_micro_batch_per_replica():
    with pytest.raises(PptkError) as err:
        Layout.from_world(world_size=4, pp=1, micro_batch_size=8, global_batch_size=20)
    assert "global_batch_size(20) is not a multiple of micro_batch_size(8) * dp(4) = 32" in str(err.value)
    assert "use global_batch_size 32 (grad_accum_steps 1), or change" in str(err.value)


def test_from_world_needs_accum_or_global_batch():
    with pytest.raises(PptkError) as err:
        Layout.from_world(world_size=4, pp=2, micro_batch_size=2)
    assert "pass grad_accum_steps (micro-batches per step) or global_batch_size" in str(err.value)
    assert "global_batch_size 16 gives grad_accum_steps 4 (= 2 * pp)" in str(err.value)


@pytest.mark.parametrize(
    ("field", "name"), [("world_size", "WORLD_SIZE"), ("pp", "--pp"), ("micro_batch_size", "--micro-batch-size")]
)
def test_from_world_rejects_non_positive(field, name):
    kwargs = dict(world_size=4, pp=2, micro_batch_size=2, grad_accum_steps=2) | {field: 0}
    with pytest.raises(PptkError, match=f"{name} must be an integer >= 1, got 0"):
        Layout.from_world(**kwargs)


def test_from_world_rejects_a_non_positive_global_batch():
    with pytest.raises(PptkError, match="--global-batch-size must be an integer >= 1, got -8"):
        Layout.from_world(world_size=4, pp=2, micro_batch_size=2, global_batch_size=-8)


def test_from_world_rejects_zero_stage_2_with_pipeline():
    with pytest.raises(PptkError, match="--zero-stage 2 with --pp 2"):
        Layout.from_world(world_size=4, pp=2, micro_batch_size=1, grad_accum_steps=4, zero_stage=2)
