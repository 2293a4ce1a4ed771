"""How many epochs a run has: ``train.epochs``, or what fits a wall-clock budget, re-decided
after every epoch.

:class:`TimeBudget` gets the seconds per step measured on a few throw-away steps
(:func:`measure_step_seconds`), plans the epochs that fit the budget, and after every real
epoch re-plans from the measured wall time (training and checkpoint included): the plan
shrinks whenever it no longer fits, grows while the caller allows it (while the learning
rate still warms up the schedule is simply stretched), and afterwards may grow back up to
its longest plan (a plan cut by a passing slowdown recovers).

:class:`EpochPlanner` applies that to a run (:class:`dpq.training.resume.RunState`): the
first plan, and each revision with what follows from it (where the method's second phase
starts, at least one epoch of it). The clock is injected, so the logic is tested with a
fake one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np

from dpq.config import TrainConfig
from dpq.training.resume import RunState

T = TypeVar("T")

FINAL_SAVE_SECONDS = 10.0
"""Fixed allowance for the final k-means, save and bookkeeping."""
SLACK_FRACTION = 0.03
"""Part of the budget held back for noise."""
RECENT_EPOCHS = 3
"""Re-plans use the mean wall time of the last few epochs."""


class TimeBudget:
    """Epoch planning for a budget of ``minutes`` of wall time.

    Args:
        minutes: the budget.
        steps_per_epoch: training steps in one epoch.
        clock: seconds as a float, e.g. ``time.perf_counter`` (the default) or a fake clock.
        started: the clock reading when the run started (default: now).
    """

    def __init__(
        self,
        minutes: float,
        steps_per_epoch: int,
        clock: Callable[[], float] = time.perf_counter,
        started: float | None = None,
    ) -> None:
        if not minutes > 0:
            raise ValueError(f"the time budget must be positive; got {minutes} minutes.")
        self.minutes = float(minutes)
        self.seconds = 60.0 * self.minutes
        self.steps_per_epoch = int(steps_per_epoch)
        self.clock = clock
        self.started = clock() if started is None else started
        self.longest_plan = 0
        self.epoch_seconds: list[float] = []

    def _fixed_seconds(self, epoch_seconds: float) -> float:
        # one forward pass over the training set for the k-means init (~1/3 of an epoch),
        # k-means, the final save, and slack for noise
        return epoch_seconds / 3 + FINAL_SAVE_SECONDS + SLACK_FRACTION * self.seconds

    def remaining(self, epoch_seconds: float) -> float:
        """Seconds left for epochs, after the fixed costs."""
        return self.seconds - (self.clock() - self.started) - self._fixed_seconds(epoch_seconds)

    def plan(self, seconds_per_step: float) -> tuple[int, dict[str, Any]]:
        """The first plan from the measured step time: (epochs, plan record for the log)."""
        epoch_seconds = seconds_per_step * self.steps_per_epoch
        epochs = max(1, int(self.remaining(epoch_seconds) // max(epoch_seconds, 1e-12)))
        self.longest_plan = epochs
        return epochs, {
            "epochs": epochs,
            "source": "time_budget",
            "budget_minutes": self.minutes,
            "seconds_per_step": round(seconds_per_step, 4),
            "steps_per_epoch": self.steps_per_epoch,
            "seconds_per_epoch": round(epoch_seconds, 2),
        }

    def fitting_epochs(self, epoch_seconds: float, epochs: int, done: int, grow: bool) -> int:
        """Epoch count that fits, once ``done`` epochs of ``epoch_seconds`` each have run.

        Never below ``done`` (or 1); above ``epochs`` only when ``grow`` is set.
        """
        fitting = done + max(0, int(self.remaining(epoch_seconds) // max(epoch_seconds, 1e-9)))
        return max(done, 1, fitting if grow else min(epochs, fitting))

    def revise(self, epoch_wall: float, epochs: int, done: int, warming_up: bool) -> int:
        """The plan after an epoch that took ``epoch_wall`` seconds (with its checkpoint).

        Args:
            epoch_wall: the wall time of the epoch that just ended.
            epochs: the current plan.
            done: epochs finished.
            warming_up: growing beyond the longest plan is allowed (the learning rate still
                warms up and no phase boundary has passed).

        Returns:
            The new epoch count (``epochs`` when unchanged).
        """
        self.epoch_seconds.append(float(epoch_wall))
        recent = self.epoch_seconds[-RECENT_EPOCHS:]
        revised = self.fitting_epochs(sum(recent) / len(recent), epochs, done, grow=True)
        if warming_up:
            self.longest_plan = max(self.longest_plan, revised)
        else:
            revised = min(revised, max(epochs, self.longest_plan))
        return revised


def measure_step_seconds(
    batches: Iterable[T],
    step: Callable[[int, T], None],
    clock: Callable[[], float],
    warmup_steps: int = 2,
) -> float:
    """Seconds per training step: ``step(i, batch)`` for each batch (fetching it included),
    timed by ``clock``; the median after ``warmup_steps`` steps, plus 5 %."""
    times = []
    begin = clock()
    for index, batch in enumerate(batches):
        step(index, batch)
        times.append(clock() - begin)
        begin = clock()
    measured = times[warmup_steps:] or times
    return float(np.median(measured)) * 1.05


class EpochPlanner:
    """The epoch count of a run and, after every epoch, its revision under a time budget.

    Args:
        config: ``epochs``, ``time_budget_minutes`` and ``warmup_fraction`` are read.
        steps_per_epoch: training steps in one epoch.
        switch_epoch: the method's first epoch of its second phase for a run of n epochs
            (n: none).
        has_second_phase: the method trains in two phases (a revised plan keeps one epoch
            of the second phase at least).
        clock, started: the clock and its reading when the run started.
        log: receives one line per plan and per change.
    """

    def __init__(
        self,
        config: TrainConfig,
        steps_per_epoch: int,
        switch_epoch: Callable[[int], int],
        has_second_phase: bool,
        clock: Callable[[], float] = time.perf_counter,
        started: float | None = None,
        log: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.config = config
        self.switch_epoch = switch_epoch
        self.has_second_phase = has_second_phase
        self.log = log
        self.budget = None
        if config.time_budget_minutes is not None:
            self.budget = TimeBudget(config.time_budget_minutes, steps_per_epoch, clock, started)

    def first_plan(self, seconds_per_step: Callable[[], float]) -> tuple[int, dict[str, Any]]:
        """(epochs, plan record): the config's, or what fits the budget at the step time
        ``seconds_per_step()`` measures (called only with a budget)."""
        if self.budget is None:
            return self.config.epochs, {"epochs": self.config.epochs, "source": "config"}
        seconds = seconds_per_step()
        epochs, plan = self.budget.plan(seconds)
        self.log(
            f"time budget {self.config.time_budget_minutes:g} min: {seconds:.3f} s/step x "
            f"{plan['steps_per_epoch']} steps = {plan['seconds_per_epoch']:.1f} s/epoch -> "
            f"{epochs} epochs"
        )
        return epochs, plan

    def new_run(self, epochs: int, plan: dict[str, Any]) -> RunState:
        """The state of a fresh run of ``epochs``."""
        return RunState(epochs=epochs, plan=plan, switch_epoch=self.switch_epoch(epochs))

    def revise(self, run: RunState, epoch_wall: float, epoch_seconds: float) -> None:
        """After an epoch that took ``epoch_wall`` seconds with its checkpoint
        (``epoch_seconds`` is its logged time): change ``run.epochs``, ``run.plan`` and
        ``run.switch_epoch`` when the budget says so. A second phase that has started goes
        on; one that has not cannot start before the next epoch."""
        if self.budget is None:
            return
        done = run.epoch
        warming_up = done < self.config.warmup_fraction * run.epochs and done < run.switch_epoch
        revised = self.budget.revise(epoch_wall, run.epochs, done, warming_up)
        if self.has_second_phase and run.switch_epoch >= done:
            revised = max(revised, done + 1)  # one epoch of the second phase at least
        if revised == run.epochs:
            return
        self.log(
            f"after epoch {done} ({epoch_seconds:.1f} s; planned "
            f"{run.plan['seconds_per_epoch']:.1f} s): {revised} epochs instead of {run.epochs} "
            "to " + ("stay within" if revised < run.epochs else "use") + " the time budget"
        )
        run.epochs = revised
        run.plan = {**run.plan, "epochs": revised, "replanned_after_epoch": done}
        if run.switch_epoch >= done:
            run.switch_epoch = max(self.switch_epoch(revised), done)
            if self.has_second_phase:
                run.switch_epoch = min(run.switch_epoch, revised - 1)
