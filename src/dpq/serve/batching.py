"""Micro-batching: queries that arrive within a few milliseconds of each other are searched
by one call of the index (its scan then reads each code once for all of them), and each
is answered on its own.

:class:`BatchQueue` decides which waiting items go out together and when; it has no threads
and no clock of its own (every call is given ``now``), so its timing is tested with an
injected clock. :class:`MicroBatcher` drives it on the event loop: :meth:`~MicroBatcher.submit`
waits for one item's answer, groups run on an executor, a timer wakes the queue at its next
deadline.

The rule (adaptive batching). Items wait in groups of one key (the search settings that
must be equal for a shared search). At most ``slots`` groups run at once. A group goes out,
oldest first, when a slot is free and

- it holds ``max_batch`` items, or
- its oldest item has waited ``max_wait`` seconds, or
- nothing is running: an idle service adds no wait.

So a lone query starts at once; while a search runs, queries gather for at most
``max_wait`` (less when the running search ends first); while every slot is busy, they
gather until one frees, and then go out together, up to ``max_batch`` at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

__all__ = ["BatchQueue", "MicroBatcher"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")


class BatchQueue(Generic[K, T]):
    """Waiting items in groups by key, and which groups to run now (see the module
    docstring for the rule).

    Args:
        max_batch: items per group at most (a larger group goes out in pieces, oldest first).
        max_wait: seconds the oldest item of a group waits at most while a slot is free.
        slots: groups running at once at most (None: no bound).
    """

    def __init__(self, max_batch: int, max_wait: float, slots: int | None) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer; got {max_batch!r}.")
        if not max_wait >= 0:
            raise ValueError(f"max_wait must be 0 or more seconds; got {max_wait!r}.")
        if slots is not None and slots < 1:
            raise ValueError(f"slots must be at least 1 or None (no bound); got {slots!r}.")
        self.max_batch = max_batch
        self.max_wait = float(max_wait)
        self.slots = slots
        self.running = 0
        self._groups: dict[K, deque[tuple[float, T]]] = {}

    def __len__(self) -> int:
        """Items waiting."""
        return sum(len(group) for group in self._groups.values())

    def put(self, key: K, item: T, now: float) -> None:
        """Add ``item`` to the group of ``key``; it arrived at ``now``."""
        self._groups.setdefault(key, deque()).append((now, item))

    def _free(self) -> bool:
        return self.slots is None or self.running < self.slots

    def _due(self, key: K, now: float, idle: bool) -> bool:
        group = self._groups[key]
        return idle or len(group) >= self.max_batch or now >= group[0][0] + self.max_wait

    def _pop(self, key: K) -> list[T]:
        group = self._groups[key]
        items = [group.popleft()[1] for _ in range(min(self.max_batch, len(group)))]
        if not group:
            del self._groups[key]
        self.running += 1
        return items

    def take(self, now: float) -> list[tuple[K, list[T]]]:
        """The groups to run now, each (key, items in arrival order), counted as running
        until :meth:`done`."""
        idle = self.running == 0
        out = []
        while self._free():
            due = [key for key in self._groups if self._due(key, now, idle)]
            if not due:
                break
            oldest = min(due, key=lambda key: self._groups[key][0][0])
            out.append((oldest, self._pop(oldest)))
        return out

    def take_all(self) -> list[tuple[K, list[T]]]:
        """Every waiting item, in groups of at most ``max_batch``, whatever the slots and
        waits (shutting down); counted as running until :meth:`done`."""
        out = []
        while self._groups:
            oldest = min(self._groups, key=lambda key: self._groups[key][0][0])
            out.append((oldest, self._pop(oldest)))
        return out

    def done(self) -> None:
        """A group taken by :meth:`take` or :meth:`take_all` has finished."""
        if self.running <= 0:
            raise RuntimeError("done() without a running group.")
        self.running -= 1

    def deadline(self) -> float | None:
        """When a waiting group falls due by its wait (its oldest arrival + max_wait); None
        when nothing waits or no slot is free (a finishing group is then what frees one)."""
        if not self._groups or not self._free():
            return None
        return min(group[0][0] for group in self._groups.values()) + self.max_wait


class MicroBatcher(Generic[K, T, R]):
    """Runs items submitted from the event loop in groups (:class:`BatchQueue`) on an
    executor, and gives each submitter its own answer.

    Every method runs on the event loop's thread (no locks); ``run`` runs on ``executor``.

    Args:
        run: ``run(key, items)`` -> per item its answer, or the exception that item raises
            (the others are still answered); if ``run`` itself raises, every item of the
            group raises it.
        executor: where groups run (the service's search pool).
        max_batch, max_wait, slots: the queue's (see :class:`BatchQueue`).
        clock: seconds, for arrival times and deadlines (tests inject one).
    """

    def __init__(
        self,
        run: Callable[[K, list[T]], Sequence[R | BaseException]],
        executor: Executor,
        max_batch: int,
        max_wait: float,
        slots: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run = run
        self._executor = executor
        self._clock = clock
        self.queue: BatchQueue[K, tuple[T, asyncio.Future]] = BatchQueue(max_batch, max_wait, slots)
        self._running: set[asyncio.Future] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def submit(self, key: K, item: T) -> R:
        """The answer to ``item``, searched with the other items of ``key`` that wait with
        it; raises what ``run`` gives for it. RuntimeError once :meth:`drain` has begun."""
        if self._closed:
            raise RuntimeError("the service is shutting down; retry on its next start.")
        self._loop = asyncio.get_running_loop()
        answer = self._loop.create_future()
        self.queue.put(key, (item, answer), self._clock())
        self._pump()
        return await answer

    async def drain(self) -> None:
        """Refuse new items, start every waiting one at once, and wait for all to finish."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while len(self.queue) or self._running:
            for key, entries in self.queue.take_all():
                self._start(key, entries)
            if self._running:
                await asyncio.wait(set(self._running))

    def _pump(self) -> None:
        for key, entries in self.queue.take(self._clock()):
            self._start(key, entries)
        if self._closed:
            return
        deadline = self.queue.deadline()
        if self._timer is not None:
            if deadline == self._timer_at:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None and self._loop is not None:
            self._timer = self._loop.call_later(max(0.0, deadline - self._clock()), self._on_timer)
            self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _start(self, key: K, entries: list[tuple[T, asyncio.Future]]) -> None:
        assert self._loop is not None  # set by submit, which put the entries there
        items = [item for item, _ in entries]
        task = self._loop.run_in_executor(self._executor, self._run, key, items)
        self._running.add(task)
        task.add_done_callback(lambda done: self._finish(done, entries))

    def _finish(self, task: asyncio.Future, entries: list[tuple[T, asyncio.Future]]) -> None:
        self._running.discard(task)
        self.queue.done()
        answers: Sequence[Any]
        if task.cancelled():
            answers = [RuntimeError("the search was cancelled (the service is stopping).")]
            answers = answers * len(entries)
        elif task.exception() is not None:
            answers = [task.exception()] * len(entries)
        else:
            answers = task.result()
            if len(answers) != len(entries):
                error = RuntimeError(f"run gave {len(answers)} answers for {len(entries)} items.")
                answers = [error] * len(entries)
        for (_, answer), result in zip(entries, answers, strict=True):
            if answer.done():  # its request went away
                continue
            if isinstance(result, BaseException):
                answer.set_exception(result)
            else:
                answer.set_result(result)
        if not self._closed:
            self._pump()
