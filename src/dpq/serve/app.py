"""The HTTP API and the web page (FastAPI): :func:`create_app` puts the parts together.

The routes (:mod:`dpq.serve.routes`) are a thin layer over :class:`Collection`; they reach
it, the settings and the metrics through the app's :class:`ServiceContext`. Errors are JSON
``{"detail": sentence}``: 401 (writes without the API key), 404 (unknown id or no image),
413 (upload limit), 415 (not an image), 422 (a bad image, vector size, k, bits, ...),
429 (rate limit), 503 (too many requests waiting).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from dpq import __version__
from dpq.serve.collection import open_collection
from dpq.serve.context import ServiceContext, Workers
from dpq.serve.images import NotAnImageError
from dpq.serve.limits import BodyLimit, RateLimit, TokenBuckets
from dpq.serve.metrics import RequestMetrics, ServiceMetrics
from dpq.serve.routes import STATIC_DIR, router
from dpq.serve.schemas import request_schemas
from dpq.serve.settings import ServeSettings

__all__ = ["create_app"]

DESCRIPTION = (
    "Search a DPQ-coded image collection by image, vector or item id, at any code length "
    "(8/16/24/32 bits from one index). The web page is at `/`."
)


async def _not_an_image(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=415)


async def _bad_value(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=422)


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
        log: where to print startup notes (default: stderr).
    """
    say = log or (lambda message: print(f"dpq serve: {message}", file=sys.stderr))
    collection = open_collection(settings, log=say)
    collection.warm_up()
    metrics = ServiceMetrics(items=lambda: len(collection))
    workers = Workers(settings.search_threads, settings.max_pending, metrics.pending)
    service = ServiceContext(settings, collection, metrics, workers)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(
        title="dpq search service", version=__version__, description=DESCRIPTION, lifespan=lifespan
    )
    app.state.service = service
    app.add_exception_handler(NotAnImageError, _not_an_image)
    app.add_exception_handler(ValueError, _bad_value)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _describe_request_bodies(app)

    # outermost first: metrics see every answer, including the limits' 413 and 429
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    if settings.rate_limit:
        buckets = TokenBuckets(settings.rate_limit, settings.burst, clock=clock)
        app.add_middleware(RateLimit, buckets=buckets, exempt=("/health", "/metrics", "/static"))
    # the router's own routes first: the app lists an included router as one opaque entry
    app.add_middleware(
        RequestMetrics, metrics=metrics, routes=lambda: [*router.routes, *app.router.routes]
    )
    return app
