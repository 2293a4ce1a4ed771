"""dpq.serve.batching: the queue's timing rule on an injected clock (no wall-clock asserts),
groups that never mix keys, and the event-loop batcher on a real thread pool: answers to
their own submitters, one item's failure kept to it, a drain that answers what waits."""

from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from dpq.serve.batching import BatchQueue, MicroBatcher

# ---------------------------------------------------------------- the queue (injected clock)


def test_an_idle_queue_sends_a_lone_item_at_once():
    queue = BatchQueue(max_batch=8, max_wait=0.002, slots=2)
    queue.put("a", 1, now=10.0)
    assert queue.take(now=10.0) == [("a", [1])]
    assert queue.running == 1 and len(queue) == 0 and queue.deadline() is None


def test_while_a_search_runs_items_wait_for_the_bound_and_no_longer():
    queue = BatchQueue(max_batch=8, max_wait=0.002, slots=2)
    queue.put("a", 1, now=0.0)
    assert queue.take(now=0.0) == [("a", [1])]  # idle: at once
    queue.put("a", 2, now=0.0005)
    queue.put("a", 3, now=0.001)
    assert queue.take(now=0.001) == []
    assert queue.deadline() == pytest.approx(0.0025)  # the oldest waiting item's bound
    assert queue.take(now=0.0024) == []
    assert queue.take(now=0.0025) == [("a", [2, 3])]
    assert queue.running == 2


def test_a_running_search_that_ends_first_sends_the_waiting_items_at_once():
    queue = BatchQueue(max_batch=8, max_wait=1.0, slots=2)
    queue.put("a", 1, now=0.0)
    queue.take(now=0.0)
    queue.put("a", 2, now=0.1)
    assert queue.take(now=0.2) == []
    queue.done()  # idle again: nothing to wait for
    assert queue.take(now=0.2) == [("a", [2])]


def test_a_full_group_goes_at_once_and_a_larger_one_in_pieces():
    queue = BatchQueue(max_batch=3, max_wait=1.0, slots=None)
    queue.put("a", 0, now=0.0)
    queue.take(now=0.0)  # one running: the others must fill up or wait
    for item in range(1, 8):
        queue.put("a", item, now=0.001 * item)
    assert queue.take(now=0.01) == [("a", [1, 2, 3]), ("a", [4, 5, 6])]
    assert len(queue) == 1 and queue.deadline() == pytest.approx(1.007)


def test_no_group_goes_without_a_free_slot():
    queue = BatchQueue(max_batch=2, max_wait=0.0, slots=1)
    queue.put("a", 1, now=0.0)
    assert queue.take(now=0.0) == [("a", [1])]
    queue.put("a", 2, now=0.0)
    queue.put("a", 3, now=0.0)
    assert queue.take(now=100.0) == [] and queue.deadline() is None  # full and overdue, no slot
    queue.done()
    assert queue.take(now=100.0) == [("a", [2, 3])]


def test_keys_are_never_mixed_and_the_oldest_group_goes_first():
    queue = BatchQueue(max_batch=8, max_wait=0.002, slots=1)
    queue.put("k10", "a", now=0.0)
    queue.put("k20", "b", now=0.001)
    queue.put("k10", "c", now=0.002)
    assert queue.take(now=0.002) == [("k10", ["a", "c"])]
    queue.done()
    assert queue.take(now=0.002) == [("k20", ["b"])]


def test_take_all_ignores_slots_and_waits():
    queue = BatchQueue(max_batch=2, max_wait=60.0, slots=1)
    queue.put("a", 0, now=0.0)
    queue.take(now=0.0)
    for item, key in enumerate("abab", start=1):
        queue.put(key, item, now=float(item))
    queue.put("a", 5, now=5.0)
    assert queue.take(now=6.0) == []
    assert queue.take_all() == [("a", [1, 3]), ("b", [2, 4]), ("a", [5])]
    assert queue.running == 4 and len(queue) == 0


def test_bad_settings_and_unbalanced_done_are_refused():
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        BatchQueue(max_batch=0, max_wait=0.0, slots=1)
    with pytest.raises(ValueError, match="max_wait must be 0 or more"):
        BatchQueue(max_batch=1, max_wait=-1.0, slots=1)
    with pytest.raises(ValueError, match="slots must be at least 1"):
        BatchQueue(max_batch=1, max_wait=0.0, slots=0)
    with pytest.raises(RuntimeError, match="without a running group"):
        BatchQueue(max_batch=1, max_wait=0.0, slots=1).done()


@pytest.mark.parametrize("seed", range(4))
def test_random_traffic_keeps_every_rule(seed):
    """Random arrivals and completions on a simulated clock: each item goes out once, in
    arrival order within its key; groups hold one key and at most max_batch items; at most
    `slots` run; and after each take nothing is left waiting past its bound, full, or while
    idle, as long as a slot is free."""
    rng = random.Random(seed)
    max_batch, max_wait, slots = 4, 0.002, 2
    queue: BatchQueue[str, tuple[str, int]] = BatchQueue(max_batch, max_wait, slots)
    now, sent, running, arrived = 0.0, [], [], {}
    for number in range(400):
        now += rng.expovariate(1 / 0.0007)
        if rng.random() < 0.6:
            key = rng.choice("xyz")
            queue.put(key, (key, number), now)
            arrived[number] = now
        if running and rng.random() < 0.4:
            running.pop(rng.randrange(len(running)))
            queue.done()
        deadline = queue.deadline()
        if deadline is not None and rng.random() < 0.5:
            now = max(now, deadline)  # the batcher's timer fires
        for key, items in queue.take(now):
            assert 1 <= len(items) <= max_batch and {k for k, _ in items} == {key}
            sent.extend(items)
            running.append(key)
        assert len(running) == queue.running <= slots
        if queue.running < slots:
            for group in queue._groups.values():
                assert len(group) < max_batch, "a full group waits beside a free slot"
                assert now < group[0][0] + max_wait, "an item waits past its bound"
            assert queue.running > 0 or not len(queue), "an idle queue holds items"
    sent.extend(item for _, items in queue.take_all() for item in items)
    assert sorted(number for _, number in sent) == sorted(arrived)
    for key in "xyz":
        numbers = [number for k, number in sent if k == key]
        assert numbers == sorted(numbers)


# ---------------------------------------------------------------- the batcher (event loop)


def _double_or_fail(key: str, items: list[int]) -> list[object]:
    return [
        ValueError(f"item {item} fails") if item % 5 == 0 else (key, item * 2) for item in items
    ]


def test_concurrent_items_are_answered_each_with_its_own_result():
    gate, groups = threading.Event(), []

    def run(key: str, items: list[int]) -> list[object]:
        assert gate.wait(10), "the test never opened the gate"
        groups.append((key, list(items)))
        return _double_or_fail(key, items)

    async def scenario() -> list[object]:
        batcher = MicroBatcher(run, pool, max_batch=4, max_wait=60.0, slots=1)
        tasks = [
            asyncio.ensure_future(batcher.submit("even" if i % 2 == 0 else "odd", i))
            for i in range(1, 15)
        ]
        for _ in range(200):  # bounded: the 13 items behind the first are queued
            if len(batcher.queue) == 13:
                break
            await asyncio.sleep(0.005)
        gate.set()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)

    with ThreadPoolExecutor(2) as pool:
        answers = asyncio.run(scenario())
    for i, answer in enumerate(answers, start=1):
        if i % 5 == 0:
            assert isinstance(answer, ValueError) and str(answer) == f"item {i} fails"
        else:
            assert answer == ("even" if i % 2 == 0 else "odd", 2 * i)
    assert groups[0] == ("odd", [1])  # the first alone (the service was idle)
    assert all(len(items) <= 4 for _, items in groups) and len(groups) < 14
    assert all(item % 2 == (key == "odd") for key, items in groups for item in items)


def test_a_failing_run_fails_its_group_only():
    def run(key: str, items: list[int]) -> list[object]:
        if key == "bad":
            raise RuntimeError("the index is gone")
        return [item + 1 for item in items]

    async def scenario() -> list[object]:
        batcher = MicroBatcher(run, pool, max_batch=8, max_wait=0.0, slots=2)
        jobs = [batcher.submit(key, i) for i, key in enumerate(["good", "bad", "good"])]
        return await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 10)

    with ThreadPoolExecutor(2) as pool:
        first, bad, last = asyncio.run(scenario())
    assert (first, last) == (1, 3)
    assert isinstance(bad, RuntimeError) and "the index is gone" in str(bad)


def test_drain_answers_waiting_items_at_once_and_refuses_new_ones():
    """Items waiting for a long bound (60 s) behind a running group go out as soon as the
    drain begins, before the running group ends; afterwards submit is refused."""
    gate = threading.Event()

    def run(key: str, items: list[int]) -> list[int]:
        if items == [0]:
            assert gate.wait(10), "the test never opened the gate"
        return [item * 10 for item in items]

    async def scenario() -> tuple[list[int], int, bool]:
        batcher = MicroBatcher(run, pool, max_batch=64, max_wait=60.0, slots=2)
        held = asyncio.ensure_future(batcher.submit("k", 0))
        await asyncio.sleep(0)
        waiting = [asyncio.ensure_future(batcher.submit("k", i)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        assert len(batcher.queue) == 3 and batcher.queue.running == 1
        draining = asyncio.ensure_future(batcher.drain())
        drained = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        still_held = not held.done()
        gate.set()
        await asyncio.wait_for(draining, 10)
        with pytest.raises(RuntimeError, match="shutting down"):
            await batcher.submit("k", 4)
        return drained, held.result(), still_held

    with ThreadPoolExecutor(2) as pool:
        try:
            drained, held, still_held = asyncio.run(scenario())
        finally:
            gate.set()
    assert drained == [10, 20, 30] and held == 0 and still_held
