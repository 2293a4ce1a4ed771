"""dpq.training.budget.TimeBudget with a fake clock: the first plan, shrinking, growing while warming
up, and growing back to the longest plan after a passing slowdown."""

import pytest

from conftest import FakeClock
from dpq.training.budget import TimeBudget


def test_the_first_plan_fits_the_budget_after_the_fixed_costs():
    clock = FakeClock()
    budget = TimeBudget(1.0, steps_per_epoch=10, clock=clock)
    epochs, plan = budget.plan(seconds_per_step=0.05)  # 0.5 s per epoch
    # 60 s - (0.5/3 + 10 + 1.8) s of fixed costs = 48.03 s -> 96 epochs
    assert epochs == 96 and plan["seconds_per_epoch"] == 0.5 and plan["source"] == "time_budget"
    assert budget.longest_plan == 96
    with pytest.raises(ValueError, match="positive"):
        TimeBudget(0.0, 10, clock=clock)


def test_fitting_epochs_shrinks_and_grows_only_when_asked():
    clock = FakeClock(100.0)
    budget = TimeBudget(1.0, steps_per_epoch=1, clock=clock, started=70.0)  # 30 s gone
    # 60 - 30 - (10/3 + 10 + 1.8) = 14.9 s left at 10 s per epoch: one more after the first
    assert budget.fitting_epochs(10.0, 50, done=1, grow=False) == 2
    assert budget.fitting_epochs(10.0, 50, done=1, grow=True) == 2
    # the plan grows only when asked to, and never drops below the epochs that already ran
    assert budget.fitting_epochs(0.01, 7, done=1, grow=False) == 7
    clock.now = 70.0  # nothing spent: 44.9 s left at 10 s per epoch -> 1 + 4
    assert budget.fitting_epochs(10.0, 2, done=1, grow=True) == 5
    clock.now = 190.0  # over budget
    assert budget.fitting_epochs(10.0, 50, done=1, grow=False) == 1
    assert budget.fitting_epochs(5.0, 50, done=3, grow=False) == 3
    clock.now = 100.0  # 3 epochs done, 30 s gone at 5 s per epoch: 16.5 s left -> 3 more
    assert budget.fitting_epochs(5.0, 50, done=3, grow=False) == 6


def test_revise_follows_slow_epochs_and_recovers_up_to_the_longest_plan():
    """Epochs 3-5 take 2 s instead of 0.5 s (another process on the machine): the plan
    shrinks, then grows back, but not beyond the first plan once the warm-up is over."""
    clock = FakeClock()
    budget = TimeBudget(1.0, steps_per_epoch=10, clock=clock)
    epochs, _ = budget.plan(seconds_per_step=0.05)
    plans = [epochs]
    done = 0
    while done < epochs:
        wall = 2.0 if 2 <= done < 5 else 0.5
        clock.advance(wall)
        done += 1
        if done < epochs:
            epochs = budget.revise(wall, epochs, done, warming_up=False)
            plans.append(epochs)
    assert plans[0] == 96
    assert min(plans) < 96 and plans.index(min(plans)) < len(plans) - 1
    assert max(plans[plans.index(min(plans)) :]) > min(plans)  # it grew back
    assert max(plans) == 96  # never beyond the longest plan
    assert 80 < epochs <= 96 and clock.now <= 60.0


def test_revise_grows_while_warming_up_when_the_first_timing_was_pessimistic():
    clock = FakeClock()
    budget = TimeBudget(0.5, steps_per_epoch=10, clock=clock)
    epochs, _ = budget.plan(seconds_per_step=0.5)  # planned 5 s per epoch, really 0.5 s
    first = epochs
    clock.advance(0.5)
    grown = budget.revise(0.5, epochs, done=1, warming_up=True)
    assert grown > first and budget.longest_plan == grown
    clock.advance(0.5)
    assert budget.revise(0.5, grown, done=2, warming_up=False) <= grown
