# The divergence guard on plain numbers: spikes, skipped updates and blown-up weights are bad steps, a streak stops
# the run, an applied NaN stops it at once.
import pytest

from pptk.errors import PptkError
from pptk.training.guards import Diverged, DivergenceGuard


def _falling(guard, steps=20):
    for step in range(1, steps + 1):
        assert not guard.check(5.0 - 0.01 * step, step=step)


def test_a_falling_loss_and_its_noisy_first_steps_are_never_bad():
    guard = DivergenceGuard()
    assert not guard.check(80.0, step=1)  # before `warmup` good steps nothing is judged
    _falling(guard)


def test_one_spike_is_a_bad_step_and_a_streak_stops_the_run():
    guard = DivergenceGuard(factor=10, max_bad_steps=3)
    _falling(guard)
    assert guard.check(1.3e9, step=21)  # the finite blow-up: bad, not checkpointed
    assert not guard.check(4.7, step=22)  # a lone spike is tolerated; the streak resets
    assert guard.check(60.0, step=23) and guard.check(61.0, step=24)
    with pytest.raises(PptkError, match=r"diverging: 62 at step 25, 3 steps in a row above 10 x the recent median"):
        guard.check(62.0, step=25)


@pytest.mark.parametrize("loss", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_the_run_at_once(loss):
    with pytest.raises(Diverged, match="^the run diverged: the loss became .* at step 3 and its update was applied; "):
        DivergenceGuard().check(loss, step=3)


def test_factor_zero_switches_the_spike_check_off():
    guard = DivergenceGuard(factor=0)
    _falling(guard)
    assert not guard.check(1e9, step=21)


def test_spiked_judges_a_loss_without_counting_it():
    """The check of the weights about to be saved: a verdict only, the streak and the median stay as they were."""
    guard = DivergenceGuard(factor=10, max_bad_steps=2)
    assert not guard.judging() and not guard.spiked(1e9)  # nothing to compare with yet
    _falling(guard)
    assert guard.judging()
    assert guard.spiked(1e9) and guard.spiked(float("nan")) and not guard.spiked(5.0)
    assert guard.bad_streak == 0 and len(guard.recent) == 20
    assert guard.check(1e9, step=21)  # one bad step: the earlier verdicts did not count toward the streak of 2


def test_a_non_finite_loss_whose_update_was_skipped_is_a_bad_step_and_a_streak_stops():
    """DeepSpeed skipped the update (fp16 overflow, bf16 check_grad_overflow): the weights are intact, so the run may
    go on; max_bad_steps such steps in a row stop it."""
    guard = DivergenceGuard(max_bad_steps=2)
    assert guard.check(float("nan"), step=1, update_skipped=True)  # during the warmup too: NaN is never judged late
    assert not guard.check(5.0, step=2)
    assert guard.check(float("inf"), step=3, update_skipped=True)
    with pytest.raises(
        Diverged, match=r"diverged: 2 bad steps in a row, the last one step 4, whose update DeepSpeed s"
    ):
        guard.check(float("nan"), step=4, update_skipped=True)


def test_a_skipped_update_is_a_bad_step_whatever_the_loss():
    """--lr 1e30: the loss, measured before each update, stays near 6 while DeepSpeed skips every update (non-finite
    gradients). Those steps are bad, so the streak stops the run instead of checkpointing blown-up weights."""
    guard = DivergenceGuard(max_bad_steps=3)
    _falling(guard)
    assert guard.check(6.245, step=21, update_skipped=True) == "DeepSpeed skipped its update (non-finite gradients)"
    assert guard.check(6.24, step=22, update_skipped=True)
    with pytest.raises(Diverged, match=r"3 bad steps in a row, the last one step 23, whose update .*; loss 6.238\)"):
        guard.check(6.238, step=23, update_skipped=True)
    assert len(guard.recent) == 20  # no skipped step's loss joined the recent level


def test_fp16s_loss_scaler_searching_its_scale_is_not_a_bad_step():
    """fp16's dynamic loss scaler skips overflowing updates by design (and raises itself at its minimum scale); a
    non-finite loss is still bad there."""
    guard = DivergenceGuard(max_bad_steps=2, dynamic_loss_scale=True)
    assert not any(guard.check(5.0, step=s, update_skipped=True) for s in range(1, 6))
    assert guard.check(float("nan"), step=6, update_skipped=True)


def test_blown_up_weights_are_a_bad_step_in_the_same_streak():
    """The save after a huge finite update is refused (its weights' norm jumped); the skipped updates after it
    continue the streak, which stops the run with the numbers."""
    guard = DivergenceGuard(max_bad_steps=3)
    assert not guard.check(6.2, step=1)  # the step's own loss predates its huge update
    assert guard.weights_blew_up(step=1, norm=5e31, reference=40.0) == "its weights' norm jumped 1.25e+30x"
    assert guard.check(6.2, step=2, update_skipped=True)
    with pytest.raises(Diverged, match="3 bad steps in a row, the last one step 3, whose update DeepSpeed skipped"):
        guard.check(6.2, step=3, update_skipped=True)
    guard = DivergenceGuard(max_bad_steps=2)
    assert guard.weights_blew_up(step=6, norm=5e31, reference=40.0)
    with pytest.raises(
        Diverged, match=r"2 bad steps in a row, the last one step 7, whose weights' norm jumped to 5e\+31, 1"
    ):
        guard.weights_blew_up(step=7, norm=5e31, reference=40.0)
