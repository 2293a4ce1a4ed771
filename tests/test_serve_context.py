"""dpq.serve.context: the workers (a bound on pending jobs answers 503, the gauge follows),
the write-key check and who may write at all (origin, cross-site, closed writes), each alone."""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from fastapi import HTTPException, Request  # noqa: E402

from dpq.serve.context import Workers, check_write, require_api_key  # noqa: E402
from dpq.serve.metrics import ServiceMetrics  # noqa: E402
from dpq.serve.settings import ServeSettings  # noqa: E402


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
        started_in_time = await asyncio.to_thread(started.wait, 10)  # the loop keeps running
        assert started_in_time, "timed out after 10 s waiting for the first job to start"
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


OWN = {"Host": "127.0.0.1:8000"}


def _settings(**fields):
    return ServeSettings(index="x.index.npz", **fields)


@pytest.mark.parametrize(
    ("headers", "settings"),
    [
        ({}, {"allow_open_writes": True}),  # a program: no Origin
        ({"Origin": "http://127.0.0.1:8000"}, {"allow_open_writes": True}),  # its own page
        ({"Origin": "http://127.0.0.1:8000", "Sec-Fetch-Site": "same-origin"}, {"api_key": "k"}),
        ({"Origin": "https://app.example"}, {"allow_open_writes": True,
                                              "cors_origins": ("https://app.example",)}),
        ({"Origin": "https://app.example", "Sec-Fetch-Site": "cross-site"},
         {"allow_open_writes": True, "cors_origins": ("https://app.example",)}),
    ],
)  # fmt: skip
def test_writes_pass_from_programs_own_pages_and_named_origins(headers, settings):
    key = {"X-API-Key": "k"} if "api_key" in settings else {}
    check_write(_request({**OWN, **headers, **key}), _settings(**settings))


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "http://127.0.0.1:9000"},  # another port of the same host: another origin
        {"Origin": "null"},  # a sandboxed frame or a file:// page
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://127.0.0.1:8000", "Sec-Fetch-Site": "cross-site"},
    ],
)
def test_writes_from_another_site_are_403_even_with_the_key(headers):
    for settings, key in [
        ({"allow_open_writes": True}, {}),
        ({"api_key": "k"}, {"X-API-Key": "k"}),
    ]:
        with pytest.raises(HTTPException) as refused:
            check_write(_request({**OWN, **headers, **key}), _settings(**settings))
        assert refused.value.status_code == 403 and "another site" in refused.value.detail


def test_writes_without_a_key_are_closed_unless_opened():
    with pytest.raises(HTTPException) as refused:
        check_write(_request(OWN), _settings())
    assert refused.value.status_code == 403
    assert "--api-key" in refused.value.detail and "--allow-open-writes" in refused.value.detail
    with pytest.raises(HTTPException) as no_key:
        check_write(_request(OWN), _settings(api_key="k", allow_open_writes=True))
    assert no_key.value.status_code == 401  # a key set always wins over open writes
