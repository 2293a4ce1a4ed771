"""Prometheus metrics of one app: latency and status per route, time per stage of a request,
items and pending requests; served at ``/metrics``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from starlette.routing import Match

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "RequestMetrics", "ServiceMetrics"]

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    """Prometheus collectors of one app, in their own registry (so several apps coexist).

    Args:
        items: the number of items in the collection now (read at each scrape).
    """

    def __init__(self, items: Callable[[], int]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "dpq_request_seconds",
            "Request latency by endpoint (route template) and method.",
            ["method", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.responses = Counter(
            "dpq_responses",
            "Responses by endpoint and status code.",
            ["method", "endpoint", "status"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "dpq_stage_seconds",
            "Time per stage of a request: decode (image bytes to pixels), encode (model "
            "features), search (index scan), write (add/remove, durable).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_queries = Histogram(
            "dpq_search_batch_queries",
            "Queries per index search of single searches (micro-batching; 1: searched alone).",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        gauge = Gauge("dpq_items", "Items in the collection.", registry=self.registry)
        gauge.set_function(lambda: float(items()))
        self.pending = Gauge(
            "dpq_pending", "Requests running or waiting for a worker.", registry=self.registry
        )

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as one observation of stage ``name``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(name).observe(time.perf_counter() - started)

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format of every collector."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetrics:
    """ASGI middleware: latency histogram and status counter per route template.

    Args:
        app: the ASGI app it wraps.
        metrics: where to record.
        routes: the app's routes now (to name requests answered before routing: 413, 429).
    """

    def __init__(self, app: Any, metrics: ServiceMetrics, routes: Callable[[], list[Any]]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _endpoint(self, scope: dict[str, Any]) -> str:
        route = scope.get("route")
        if route is None:  # answered before routing (413, 429) or no route: match it now
            for candidate in self.routes():
                if candidate.matches(scope)[0] == Match.FULL:
                    route = candidate
                    break
        path = getattr(route, "path", None)
        return str(path) if path is not None else "unmatched"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            endpoint = self._endpoint(scope)
            method = scope["method"]
            self.metrics.request_seconds.labels(method, endpoint).observe(
                time.perf_counter() - started
            )
            self.metrics.responses.labels(method, endpoint, str(status)).inc()
