"""dpq.serve.locks: many readers at once, one writer alone, and a waiting writer holds off
new readers (no writer starvation)."""

from __future__ import annotations

import threading

from conftest import join_threads, wait_until
from dpq.serve.locks import ReadWriteLock


def test_readers_share_and_a_writer_waits_for_them():
    lock = ReadWriteLock()
    both_in, release = threading.Barrier(2, timeout=10), threading.Event()
    events: list[str] = []

    def reader(name: str) -> None:
        with lock.reading():
            both_in.wait()  # both readers hold the lock at once, or this times out
            events.append(f"{name} in")
            assert release.wait(10), "the test never released the readers"

    def writer() -> None:
        with lock.writing():
            events.append("writer")

    readers = [threading.Thread(target=reader, args=(name,)) for name in "ab"]
    for thread in readers:
        thread.start()
    wait_until(lambda: len(events) >= 2, 20, "both readers inside the lock at once")
    writing = threading.Thread(target=writer)
    writing.start()
    writing.join(0.2)
    assert writing.is_alive() and "writer" not in events  # held off by the two readers
    late: list[str] = []

    def late_read() -> None:
        with lock.reading():
            late.append("read")

    late_reader = threading.Thread(target=late_read)
    late_reader.start()
    late_reader.join(0.2)
    assert late == []  # a waiting writer holds off a new reader
    release.set()
    join_threads([*readers, writing, late_reader], 10, "the readers and the writer to finish")
    assert events[-1] == "writer" and len(late) == 1
