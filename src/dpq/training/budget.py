"""A wall-clock training budget: how many epochs fit, re-decided after every epoch.

:class:`TimeBudget` gets the seconds per step measured on a few throw-away steps, plans the
epochs that fit the budget, and after every real epoch re-plans from the measured wall time
(training and checkpoint included): the plan shrinks whenever it no longer fits, grows while
the caller allows it (while the learning rate still warms up the schedule is simply
stretched), and afterwards may grow back up to its longest plan (a plan cut by a passing
slowdown recovers). The clock is injected, so the logic is tested with a fake one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

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
