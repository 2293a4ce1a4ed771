"""Where an encoding spends its time: seconds and items/s per stage.

The stages of :func:`dpq.encode.build.build_index` and :func:`dpq.encode.job.encode_collection`,
each timed on the thread that runs the encoding:

- "decode": opening the source (decoding every image up front when it is read into memory)
  and waiting for the next batch (with DataLoader workers decoding ahead, only the part that
  the network did not hide);
- "network": the inference engine's forward passes (raw inputs -> searched features);
- "codes": the method's encoder (features -> codes) and adding them to the index;
- "file": writing the index file (or appending to it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

STAGES = ("decode", "network", "codes", "file")


@dataclass
class StageTimes:
    """Seconds spent in each of :data:`STAGES`, and the items that went through them.

    Attributes:
        items: items encoded.
        seconds: stage -> seconds (float).
        clock: a monotonic clock in seconds (injected by tests).
    """

    items: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    clock: Callable[[], float] = time.perf_counter

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the time the ``with`` block takes to the stage ``name``."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(STAGES)}.")
        began = self.clock()
        try:
            yield
        finally:
            self.seconds[name] += self.clock() - began

    def rate(self, name: str) -> float:
        """Items per second through the stage ``name`` (inf when it took no measurable time)."""
        seconds = self.seconds[name]
        return self.items / seconds if seconds > 0 else float("inf")

    def summary(self) -> str:
        """One line: items/s and seconds of each stage, e.g. ``items/s by stage (1,200
        items): decode 12,000 (0.10 s), network 900 (1.33 s), codes 40,000 (0.03 s), file -
        (0.00 s)`` ("-": no measurable time)."""
        parts = []
        for name in STAGES:
            rate = self.rate(name)
            shown = "-" if rate == float("inf") else f"{rate:,.0f}"
            parts.append(f"{name} {shown} ({self.seconds[name]:.2f} s)")
        return f"items/s by stage ({self.items:,} items): " + ", ".join(parts)
