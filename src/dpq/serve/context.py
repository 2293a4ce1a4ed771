"""What the routes reach: the app's :class:`ServiceContext` (settings, collection, metrics,
workers, the search batcher), kept in ``app.state.service`` and handed to each route by the FastAPI dependency
:func:`service_context`; and who may write (:func:`check_write`)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import HTTPException, Request

from dpq.serve.batching import MicroBatcher
from dpq.serve.collection import Collection
from dpq.serve.metrics import ServiceMetrics
from dpq.serve.settings import ServeSettings

__all__ = ["ServiceContext", "Workers", "check_write", "require_api_key", "service_context"]

T = TypeVar("T")


class Workers:
    """The search thread pool and the single writer thread, with a bound on waiting work.

    Searches, decoding and model calls run on ``search_pool`` (the numba scan releases the
    GIL), writes on ``write_pool`` one at a time, never on the event loop. Beyond
    ``max_pending`` jobs running or waiting, :meth:`run` answers 503.

    Args:
        threads: threads of the search pool.
        max_pending: jobs running or waiting beyond this are refused.
        pending: a gauge (``.set(n)``) that follows the count of pending jobs.
    """

    def __init__(self, threads: int, max_pending: int, pending: Any) -> None:
        self.search_pool = ThreadPoolExecutor(threads, thread_name_prefix="dpq-search")
        self.write_pool = ThreadPoolExecutor(1, thread_name_prefix="dpq-write")
        self.max_pending = max_pending
        self._pending = 0
        self._lock = threading.Lock()
        self._gauge = pending

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Count the block as one pending job; HTTPException 503 when too many are pending
        (a search waiting in the batcher counts as one, as a job on a pool does)."""
        with self._lock:
            if self._pending >= self.max_pending:
                raise HTTPException(
                    503,
                    f"the service is busy ({self._pending} requests running or waiting); "
                    "retry shortly.",
                    headers={"Retry-After": "1"},
                )
            self._pending += 1
            self._gauge.set(self._pending)
        try:
            yield
        finally:
            with self._lock:
                self._pending -= 1
                self._gauge.set(self._pending)

    async def run(self, pool: ThreadPoolExecutor, job: Callable[[], T]) -> T:
        """job() on ``pool``, awaited; HTTPException 503 when too many jobs are pending."""
        with self.admitted():
            return await asyncio.get_running_loop().run_in_executor(pool, job)

    async def search(self, job: Callable[[], T]) -> T:
        """job() on the search pool (reads, decoding, model calls)."""
        return await self.run(self.search_pool, job)

    async def write(self, job: Callable[[], T]) -> T:
        """job() on the single writer thread (adds, removes)."""
        return await self.run(self.write_pool, job)

    def close(self) -> None:
        self.search_pool.shutdown(wait=True, cancel_futures=True)
        self.write_pool.shutdown(wait=True)


@dataclass(frozen=True)
class ServiceContext:
    """Everything a route of one app uses; ``searches`` batches single searches
    (:mod:`dpq.serve.batching`, run on the search pool)."""

    settings: ServeSettings
    collection: Collection
    metrics: ServiceMetrics
    workers: Workers
    searches: MicroBatcher

    async def shutdown(self) -> None:
        """Answer the searches still waiting, then :meth:`close` (app shutdown)."""
        await self.searches.drain()
        self.close()

    def close(self) -> None:
        """Stop the workers, then compact and close the collection."""
        self.workers.close()
        self.collection.close()


async def service_context(request: Request) -> ServiceContext:
    """The FastAPI dependency giving a route its app's :class:`ServiceContext`.

    A coroutine on purpose: FastAPI runs a plain ``def`` dependency on its thread pool, a
    thread hand-off per request that cost ~9 % of the event loop's time under load."""
    return request.app.state.service


def require_api_key(request: Request, api_key: str | None) -> None:
    """HTTPException 401 unless the request carries ``api_key`` (header ``X-API-Key`` or
    ``Authorization: Bearer KEY``); nothing to check when ``api_key`` is None."""
    if api_key is None:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if given is None or not hmac.compare_digest(given.encode(), api_key.encode()):
        raise HTTPException(
            401,
            "this service needs an API key for writes: send it in the X-API-Key header "
            "(or Authorization: Bearer KEY).",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _netloc(origin: str) -> str:
    return origin.partition("://")[2].lower()


def check_write(request: Request, settings: ServeSettings) -> None:
    """HTTPException 403 or 401 unless this request may add or delete items.

    A write must not come from another site's page (OWASP's CSRF rule: a page can send
    "simple" requests - form posts, text/plain or form-encoded fetches - to any address
    without a CORS preflight): an ``Origin`` header other than the service's own (by host
    and port) or one of ``settings.cors_origins``, or ``Sec-Fetch-Site: cross-site`` from
    an origin not named there, gets 403. Programs send no ``Origin`` and pass. Then the
    key, when one is set (401 without it); without a key writes need
    ``settings.allow_open_writes`` (403 otherwise).
    """
    origin = request.headers.get("origin")
    allowed = origin is not None and origin in settings.cors_origins
    own = origin is not None and _netloc(origin) == request.headers.get("host", "").lower()
    cross_site = request.headers.get("sec-fetch-site", "").lower() == "cross-site"
    if (origin is not None and not (own or allowed)) or (cross_site and not allowed):
        raise HTTPException(
            403,
            f"writes are not accepted from another site's page (Origin {origin or 'unknown'}); "
            "write from this service's own page or a program, or start the service with "
            "--cors-origin ORIGIN for a page you trust.",
        )
    if settings.api_key is not None:
        require_api_key(request, settings.api_key)
    elif not settings.allow_open_writes:
        raise HTTPException(
            403,
            "writes are closed on this service: start it with --api-key (or DPQ_API_KEY) and "
            "send the key, or with --allow-open-writes to let anyone who can reach it write.",
        )
