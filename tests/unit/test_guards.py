# The divergence guard on plain numbers: spikes are bad steps, a streak stops the run, NaN stops it at once.
import pytest

from pptk.errors import PptkError
from pptk.training.guards import DivergenceGuard


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
    with pytest.raises(PptkError, match="loss became .* at step 3; resume from the last checkpoint"):
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
    with pytest.raises(PptkError, match=r"not finite \(nan\) at step 4, 2 steps in a row \(DeepSpeed skipped"):
        guard.check(float("nan"), step=4, update_skipped=True)
