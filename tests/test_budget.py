"""dpq.training.budget with a fake clock: TimeBudget's first plan, shrinking, growing while
warming up, and growing back to the longest plan after a passing slowdown; the step timing;
EpochPlanner's plans and revisions of a run with a second phase."""

import pytest

from conftest import FakeClock
from dpq.config import TrainConfig
from dpq.training.budget import EpochPlanner, TimeBudget, measure_step_seconds


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


def test_step_timing_is_the_median_after_the_warm_up_plus_five_percent():
    clock = FakeClock()
    seconds = [9.0, 5.0, 1.0, 3.0, 2.0]  # the first two are the warm-up
    fetched = []

    def step(index, batch):
        fetched.append(batch)
        clock.advance(seconds[index])

    assert measure_step_seconds("abcde", step, clock) == pytest.approx(2.0 * 1.05)
    assert fetched == list("abcde")
    assert measure_step_seconds("a", lambda i, b: clock.advance(4.0), clock) == pytest.approx(4.2)


def _planner(clock, minutes=None, epochs=10, **train):
    config = TrainConfig(epochs=epochs, time_budget_minutes=minutes, **train)

    def switch(n):  # a method whose second phase starts halfway (at least one epoch of it)
        return min(n // 2, n - 1)

    messages = []
    planner = EpochPlanner(config, 10, switch, True, clock, clock(), messages.append)
    return planner, messages


def test_without_a_budget_the_plan_is_the_config_and_is_never_revised():
    clock = FakeClock()
    planner, messages = _planner(clock, epochs=6)
    measured = []
    epochs, plan = planner.first_plan(lambda: measured.append(1) or 1.0)
    assert (epochs, plan, measured) == (6, {"epochs": 6, "source": "config"}, [])
    run = planner.new_run(epochs, plan)
    assert run.switch_epoch == 3 and run.epoch == 0
    run.epoch = 1
    planner.revise(run, 100.0, 100.0)
    assert run.epochs == 6 and messages == []


def test_a_slow_epoch_shortens_the_run_and_moves_the_second_phase_with_it():
    clock = FakeClock()
    planner, messages = _planner(clock, minutes=1.0, warmup_fraction=0.0)
    epochs, plan = planner.first_plan(lambda: 0.05)  # 0.5 s per epoch
    assert epochs == 96 and messages[0].endswith("-> 96 epochs")
    run = planner.new_run(epochs, plan)
    assert run.switch_epoch == 48
    clock.advance(20.0)
    run.epoch = 1
    planner.revise(run, epoch_wall=20.0, epoch_seconds=19.5)  # 20 s per epoch from now on
    # 60 - 20 - (20/3 + 10 + 1.8) = 21.5 s left -> 1 more epoch
    assert run.epochs == 2 and run.plan["replanned_after_epoch"] == 1
    assert run.switch_epoch == 1  # the second phase still gets its epoch
    assert "after epoch 1 (19.5 s; planned 0.5 s): 2 epochs instead of 96" in messages[-1]


def test_a_second_phase_that_has_not_started_keeps_one_epoch_at_least():
    clock = FakeClock()
    planner, _ = _planner(clock, minutes=0.5, warmup_fraction=0.0)
    epochs, plan = planner.first_plan(lambda: 0.05)
    run = planner.new_run(epochs, plan)
    clock.advance(29.0)  # nothing fits any more
    run.epoch = 1
    planner.revise(run, epoch_wall=29.0, epoch_seconds=29.0)
    assert run.epochs == 2 and run.switch_epoch == 1
