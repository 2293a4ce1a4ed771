"""dpq.encode.stages.StageTimes: seconds add up per stage on an injected clock, rates are
items per second, and the summary line names every stage."""

import pytest

from dpq.encode.stages import STAGES, StageTimes


class Ticks:
    """A clock that moves by ``step`` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_each_with_block_adds_its_time_to_its_stage():
    times = StageTimes(clock=Ticks(0.5))
    for _ in range(3):
        with times.stage("network"):
            pass
    with times.stage("decode"):
        pass
    assert times.seconds == {"decode": 0.5, "network": 1.5, "codes": 0.0, "file": 0.0}
    assert list(times.seconds) == list(STAGES)


def test_time_is_counted_when_the_block_raises():
    times = StageTimes(clock=Ticks(2.0))
    with pytest.raises(KeyError), times.stage("codes"):
        raise KeyError("boom")
    assert times.seconds["codes"] == 2.0


def test_rates_and_summary():
    times = StageTimes(items=1200, clock=Ticks(0.25))
    with times.stage("network"):
        pass
    assert times.rate("network") == 4800.0
    assert times.rate("file") == float("inf")
    assert times.summary() == (
        "items/s by stage (1,200 items): decode - (0.00 s), network 4,800 (0.25 s), "
        "codes - (0.00 s), file - (0.00 s)"
    )


def test_an_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="unknown stage 'read'; the stages are decode, network"):
        with StageTimes().stage("read"):
            pass
