"""The HTTP API and the web page (FastAPI): :func:`create_app` puts the parts together.

The routes (:mod:`dpq.serve.routes`) are a thin layer over :class:`Collection`; they reach
it, the settings and the metrics through the app's :class:`ServiceContext`. Errors are JSON
``{"detail": sentence}``: 401 (writes without the API key), 403 (writes closed, or from
another site's page), 404 (unknown id or no image), 413 (upload limit), 415 (not JSON,
not an image), 422 (a bad image, vector size, k, bits, ...), 429 (rate limit), 503 (too
many requests waiting, or a write that could not be stored). The API description's
``/docs`` page is served from the ``fastapi-offline`` package: it works without a network.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from dpq import __version__
from dpq.serve.batching import MicroBatcher
from dpq.serve.collection import UnknownItemError, open_collection
from dpq.serve.context import ServiceContext, Workers
from dpq.serve.fast_search import JSONSearchFastPath
from dpq.serve.images import NotAnImageError
from dpq.serve.journal import WriteFailedError
from dpq.serve.limits import BodyLimit, RateLimit, TokenBuckets
from dpq.serve.metrics import RequestMetrics, ServiceMetrics
from dpq.serve.routes import STATIC_DIR, router, search
from dpq.serve.schemas import request_schemas
from dpq.serve.searches import answer_queries
from dpq.serve.settings import ServeSettings

__all__ = ["create_app", "writes_note"]

DESCRIPTION = (
    "Search a DPQ-coded image collection by image, vector or item id, at any code length "
    "(8/16/24/32 bits from one index). Results at equal distance are tied: each answer says "
    "where (`tie_groups`). The web page is at `/`."
)
DOCS_ASSETS = "/static-docs"  # Swagger UI's script and style, from fastapi-offline


async def _not_an_image(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=415)


async def _bad_value(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=422)


async def _unknown_item(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


async def _not_stored(_request: Request, exc: Exception) -> JSONResponse:
    """A write that could not be stored: 503 and one sentence (the journal is as before)."""
    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "10"})


def writes_note(settings: ServeSettings) -> str:
    """Who may write, for the startup line."""
    return {
        "api-key": "writes need the API key",
        "open": "writes are OPEN to anyone who can reach this port (--allow-open-writes)",
        "closed": "read-only: writes need --api-key (or DPQ_API_KEY) or --allow-open-writes",
    }[settings.writes]


def _describe_request_bodies(app: FastAPI) -> None:
    """Add the request models the routes parse themselves to the OpenAPI components, so
    that the ``$ref`` of their request bodies resolve."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, body in request_schemas().items():
                components.setdefault(name, body)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(
    settings: ServeSettings,
    *,
    clock: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] | None = None,
) -> FastAPI:
    """The FastAPI app serving ``settings.index`` (opened, and its journal replayed, now).

    Args:
        settings: what to serve and with which limits (host, port, access_log and
            log_level are the server's: :func:`dpq.serve.serve`).
        clock: the rate limiter's clock in seconds (tests inject one).
        log: where to print startup notes: journal replay, code usage and its warnings
            (default: stderr).
    """
    say = log or (lambda message: print(f"dpq serve: {message}", file=sys.stderr))
    collection = open_collection(settings, log=say)
    collection.warm_up()
    metrics = ServiceMetrics(items=lambda: len(collection))
    workers = Workers(settings.search_threads, settings.max_pending, metrics.pending)
    searches = MicroBatcher(
        lambda _key, queries: answer_queries(service, queries),
        workers.search_pool,
        max_batch=settings.batch_max,
        max_wait=settings.batch_wait_ms / 1000,
        slots=settings.batch_slots,
    )
    service = ServiceContext(settings, collection, metrics, workers, searches)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await service.shutdown()

    app = FastAPIOffline(
        title="dpq search service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        redoc_url=None,
        static_url=DOCS_ASSETS,
    )
    app.state.service = service
    app.add_exception_handler(NotAnImageError, _not_an_image)
    app.add_exception_handler(ValueError, _bad_value)
    app.add_exception_handler(UnknownItemError, _unknown_item)
    app.add_exception_handler(WriteFailedError, _not_stored)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _describe_request_bodies(app)

    # innermost first: JSON searches skip FastAPI's routing, yet pass every limit below
    search_route = next(r for r in router.routes if getattr(r, "endpoint", None) is search)
    app.add_middleware(
        JSONSearchFastPath,
        service=service,
        route=search_route,
        handlers=app.exception_handlers,
    )
    # then outward: metrics see every answer, including the limits' 413 and 429
    if settings.cors_origins:  # pages of these origins may call the API (preflights too)
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["content-type", "x-api-key", "authorization"],
        )
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    if settings.rate_limit:
        buckets = TokenBuckets(settings.rate_limit, settings.burst, clock=clock)
        exempt = ("/health", "/metrics", "/static", "/docs", "/openapi.json")
        app.add_middleware(RateLimit, buckets=buckets, exempt=exempt)
    # the router's own routes first: the app lists an included router as one opaque entry
    app.add_middleware(
        RequestMetrics, metrics=metrics, routes=lambda: [*router.routes, *app.router.routes]
    )
    return app
