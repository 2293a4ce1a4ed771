"""dpq.serve.context: the workers (a bound on pending jobs answers 503, the gauge follows)
and the write-key check, each alone."""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from fastapi import HTTPException, Request  # noqa: E402

from dpq.serve.context import Workers, require_api_key  # noqa: E402
from dpq.serve.metrics import ServiceMetrics  # noqa: E402


def _pending(metrics: ServiceMetrics) -> float:
    return metrics.registry.get_sample_value("dpq_pending")


def test_workers_refuse_beyond_max_pending_and_count_pending():
    metrics = ServiceMetrics(items=lambda: 0)
    workers = Workers(threads=2, max_pending=1, pending=metrics.pending)
    started, release = threading.Event(), threading.Event()

    def blocking() -> str:
        started.set()
        assert release.wait(10), "the test never released the job"
        return "done"

    async def scenario() -> tuple[str, HTTPException, float]:
        first = asyncio.ensure_future(workers.search(blocking))
        while not started.is_set():  # bounded: blocking() sets it once a thread runs it
            await asyncio.sleep(0.005)
        with pytest.raises(HTTPException) as refused:
            await workers.write(lambda: "never runs")
        during = _pending(metrics)
        release.set()
        return await asyncio.wait_for(first, 10), refused.value, during

    try:
        result, refused, during = asyncio.run(scenario())
    finally:
        release.set()
        workers.close()
    assert result == "done" and during == 1.0 and _pending(metrics) == 0.0
    assert refused.status_code == 503 and refused.headers == {"Retry-After": "1"}
    assert "busy (1 requests running or waiting)" in refused.detail


def test_writes_run_one_at_a_time_on_one_thread():
    workers = Workers(threads=2, max_pending=10, pending=ServiceMetrics(lambda: 0).pending)

    async def scenario() -> list[str]:
        return list(await asyncio.gather(*(workers.write(threading.current_thread) for _ in "ab")))

    try:
        names = {thread.name for thread in asyncio.run(scenario())}
    finally:
        workers.close()
    assert len(names) == 1 and names.pop().startswith("dpq-write")


def _request(headers: dict[str, str]) -> Request:
    raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/items", "headers": raw})


@pytest.mark.parametrize(
    "headers",
    [{"X-API-Key": "k3y"}, {"Authorization": "Bearer k3y"}, {"authorization": "bearer  k3y "}],
)
def test_the_right_key_passes(headers):
    require_api_key(_request(headers), "k3y")


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-API-Key": "wrong"}, {"Authorization": "Basic k3y"}, {"X-API-Key": ""}],
)
def test_a_missing_or_wrong_key_is_refused(headers):
    with pytest.raises(HTTPException) as refused:
        require_api_key(_request(headers), "k3y")
    assert refused.value.status_code == 401 and "X-API-Key" in refused.value.detail
    assert refused.value.headers == {"WWW-Authenticate": "Bearer"}


def test_no_key_set_means_open_writes():
    require_api_key(_request({}), None)
