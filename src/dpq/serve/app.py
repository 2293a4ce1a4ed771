"""The HTTP API and the web page (FastAPI): a thin layer over :class:`Collection`.

Searches, decoding and model calls run on a thread pool (the numba scan releases the GIL),
never on the event loop; writes go through a single writer thread. Errors are JSON
``{"detail": sentence}``: 401 (writes without the API key), 404 (unknown id or no image),
413 (upload limit), 415 (not an image), 422 (a bad image, vector size, k, bits, ...),
429 (rate limit), 503 (too many requests waiting).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.routing import Match

from dpq import __version__
from dpq.serve.collection import Collection, SearchHits, open_collection
from dpq.serve.images import (
    DEFAULT_MAX_PIXELS,
    NotAnImageError,
    decode_upload,
    model_input,
)
from dpq.serve.limits import BodyLimit, RateLimit, TokenBuckets

__all__ = ["create_app", "SearchRequest", "AddRequest"]

STATIC_DIR = Path(__file__).parent / "static"
API_KEY_ENV = "DPQ_API_KEY"
DEFAULT_MAX_UPLOAD_BYTES = 10 * 2**20
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# ---------------------------------------------------------------- request and response bodies


class SearchRequest(BaseModel):
    """A query: exactly one of ``image`` (base64 file bytes), ``vector`` (D floats) or ``id``
    (an item in the collection, searched with the reconstruction of its code)."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description="base64 of an image file (needs a model)")
    vector: list[float] | None = Field(None, description="a query feature vector of length D")
    id: int | None = Field(None, description="search with this item's reconstructed vector")
    k: int = Field(20, ge=1, le=1000, description="results to return")
    offset: int = Field(0, ge=0, le=10_000, description="skip this many ranks (paging)")
    bits: int | None = Field(None, description="code length to rank with (default: all levels)")
    rerank: int | None = Field(
        None, description="shortlist with this shorter code length, then re-rank with `bits`"
    )
    rerank_candidates: int | None = Field(None, ge=1, le=100_000, description="shortlist size")
    nprobe: int | None = Field(None, ge=1, description="partitions to visit (partitioned indexes)")


class SearchResult(BaseModel):
    id: int
    distance: float
    label: Any = None
    image_url: str | None = None


class SearchResponse(BaseModel):
    results: list[SearchResult]
    bits: int
    took_ms: float
    k: int
    offset: int
    total: int = Field(description="items in the collection")
    query: dict[str, Any] = Field(description="the query's id and label, for an id query")


class AddRequest(BaseModel):
    """Items to add: ``vectors`` (n, D) or ``images`` (base64 files, needs a model), with
    optional ``labels`` (class names or indices, None for unknown) and ``names``."""

    model_config = ConfigDict(extra="forbid")

    vectors: list[list[float]] | None = Field(None, max_length=10_000)
    images: list[str] | None = Field(None, max_length=1000)
    labels: list[Any] | None = None
    names: list[str | None] | None = None


class AddResponse(BaseModel):
    ids: list[int]
    items: int = Field(description="items in the collection after the add")


# ---------------------------------------------------------------- metrics


class _Metrics:
    """Prometheus collectors of one app (own registry, so several apps can coexist)."""

    def __init__(self, collection: Collection) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "dpq_request_seconds",
            "Request latency by endpoint (route template) and method.",
            ["method", "endpoint"],
            buckets=_LATENCY_BUCKETS,
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
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        items = Gauge("dpq_items", "Items in the collection.", registry=self.registry)
        items.set_function(lambda: float(len(collection)))
        busy = Gauge(
            "dpq_pending", "Requests running or waiting for a worker.", registry=self.registry
        )
        self.pending = busy

    @contextlib.contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(name).observe(time.perf_counter() - started)


class _RequestMetrics:
    """ASGI middleware: latency histogram and status counter per route template."""

    def __init__(self, app: Any, metrics: _Metrics, routes: Callable[[], list[Any]]) -> None:
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


# ---------------------------------------------------------------- the app


class _Workers:
    """The search thread pool and the single writer thread, with a bound on waiting work."""

    def __init__(self, threads: int, max_pending: int, metrics: _Metrics) -> None:
        self.search_pool = ThreadPoolExecutor(threads, thread_name_prefix="dpq-search")
        self.write_pool = ThreadPoolExecutor(1, thread_name_prefix="dpq-write")
        self.max_pending = max_pending
        self._pending = 0
        self._lock = threading.Lock()
        self._metrics = metrics

    async def run(self, pool: ThreadPoolExecutor, job: Callable[[], Any]) -> Any:
        with self._lock:
            if self._pending >= self.max_pending:
                raise HTTPException(
                    503,
                    f"the service is busy ({self._pending} requests running or waiting); "
                    "retry shortly.",
                    headers={"Retry-After": "1"},
                )
            self._pending += 1
            self._metrics.pending.set(self._pending)
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, job)
        finally:
            with self._lock:
                self._pending -= 1
                self._metrics.pending.set(self._pending)

    def close(self) -> None:
        self.search_pool.shutdown(wait=True, cancel_futures=True)
        self.write_pool.shutdown(wait=True)


def _b64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(
            data.split(",", 1)[1] if data.startswith("data:") else data, validate=True
        )
    except (binascii.Error, ValueError):
        raise ValueError(
            f"{what} is not valid base64; send the file's bytes base64-encoded."
        ) from None


def _int_field(form: Any, name: str) -> int | None:
    value = form.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, UploadFile):
        raise ValueError(f"form field {name!r} must be a number, not a file.")
    return value  # pydantic converts and checks it


def create_app(
    index: str | os.PathLike[str],
    model: str | os.PathLike[str] | None = None,
    images: str | None = None,
    *,
    image_root: str | None = None,
    image_size: int | None = None,
    api_key: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    rate_limit: float = 0.0,
    rate_burst: int | None = None,
    threads: int | None = None,
    max_pending: int = 256,
    thumbnail_size: int = 128,
    compact_bytes: int | None = None,
    fsync: bool = True,
    model_threads: int | None = None,
    device: str = "cpu",
    clock: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] | None = None,
) -> FastAPI:
    """The FastAPI app serving one index (opened, and its journal replayed, right away).

    Args:
        index: an index file from ``dpq encode``.
        model: its model's checkpoint directory: queries and adds may then be images.
        images: the source the index was encoded from (ids = row numbers): thumbnails.
        image_root, image_size: as for ``dpq encode`` (list files; the model's input size).
        api_key: required (header ``X-API-Key`` or ``Authorization: Bearer``) for POST /items
            and DELETE /items/{id}; None: writes are open.
        max_upload_bytes: larger request bodies get 413.
        max_image_pixels: images declaring more pixels get 422 (decompression bombs).
        rate_limit: requests per second per client address (0: no limit); ``rate_burst``
            the bucket size (default: max(1, 2 x rate)).
        threads: search threads (default: the CPU count).
        max_pending: requests running or waiting beyond this get 503.
        thumbnail_size: longer side of thumbnails in pixels.
        compact_bytes: compact the journal beyond this size (default 64 MiB).
        fsync: fsync each journal append (keep on).
        model_threads: torch threads for the model (None: torch's default).
        device: where the model runs ("auto", "cpu", "cuda", "cuda:N", "mps").
        clock: the rate limiter's clock (tests inject one).
        log: where to print startup notes (default: stderr).
    """
    say = log or (lambda message: print(f"dpq serve: {message}", file=sys.stderr))
    options: dict[str, Any] = {}
    if compact_bytes is not None:
        options["compact_bytes"] = compact_bytes
    collection = open_collection(
        index,
        model_path=model,
        images=images,
        image_root=image_root,
        image_size=image_size,
        thumbnail_size=thumbnail_size,
        fsync=fsync,
        model_threads=model_threads,
        device=device,
        log=say,
        **options,
    )
    collection.warm_up()
    metrics = _Metrics(collection)
    workers = _Workers(threads or os.cpu_count() or 2, max_pending, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        workers.close()
        collection.close()

    app = FastAPI(
        title="dpq search service",
        version=__version__,
        description="Search a DPQ-coded image collection by image, vector or item id, at any "
        "code length (8/16/24/32 bits from one index). The web page is at `/`.",
        lifespan=lifespan,
    )
    app.state.collection = collection
    app.state.metrics = metrics

    # ---- errors -------------------------------------------------------------------------------

    @app.exception_handler(NotAnImageError)
    async def _not_an_image(_request: Request, exc: NotAnImageError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=415)

    @app.exception_handler(ValueError)
    async def _bad_value(_request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    def require_key(request: Request) -> None:
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

    # ---- query helpers ------------------------------------------------------------------------

    def image_array(data: bytes, name: str) -> tuple[np.ndarray, Any]:
        """(model input uint8 (H, W, 3), decoded image) of uploaded bytes; times 'decode'."""
        if not collection.accepts_images:
            raise ValueError(
                "this service has no model, so it cannot take images; send a vector or an "
                "id, or restart it with --model."
            )
        with metrics.stage("decode"):
            picture = decode_upload(data, name, max_image_pixels)
            assert collection.image_size is not None
            return model_input(picture, collection.image_size), picture

    def run_search(
        params: SearchRequest, upload: tuple[bytes, str] | None, started: float
    ) -> dict[str, Any]:
        given = [params.image is not None or upload is not None, params.vector is not None]
        given.append(params.id is not None)
        if sum(given) != 1:
            raise ValueError(
                "give exactly one query: an uploaded image, 'image' (base64), 'vector' or 'id'."
            )
        query: dict[str, Any] = {}
        if params.id is not None:
            vector = collection.vector_of(params.id)
            if vector is None:
                raise HTTPException(404, f"no item with id {params.id} in this collection.")
            query = {"id": params.id, "label": collection.label_of(params.id)}
        elif params.vector is not None:
            vector = np.asarray(params.vector, np.float32)
            if vector.shape != (collection.index.dim,):
                raise ValueError(
                    f"the vector has {vector.size} values but this index expects "
                    f"{collection.index.dim} (its feature dimension D)."
                )
        else:
            data, name = upload if upload is not None else (_b64(params.image, "image"), "image")
            pixels, _ = image_array(data, name)
            with metrics.stage("encode"):
                vector = collection.features_of_images([pixels])[0]
        with metrics.stage("search"):
            hits = collection.search(
                vector,
                k=params.k,
                bits=params.bits,
                offset=params.offset,
                rerank=params.rerank,
                rerank_candidates=params.rerank_candidates,
                nprobe=params.nprobe,
            )
        return _search_body(collection, hits, params, query, started)

    async def parse_search(request: Request) -> tuple[SearchRequest, tuple[bytes, str] | None]:
        kind = request.headers.get("content-type", "")
        upload = None
        try:
            if kind.startswith("multipart/form-data"):
                async with request.form(max_files=1) as form:
                    file = form.get("file") or form.get("image")
                    if isinstance(file, UploadFile):
                        upload = (await file.read(), file.filename or "upload")
                    fields = {
                        name: _int_field(form, name)
                        for name in (
                            "k",
                            "offset",
                            "bits",
                            "rerank",
                            "rerank_candidates",
                            "nprobe",
                            "id",
                        )
                    }
                    params = SearchRequest.model_validate(
                        {name: value for name, value in fields.items() if value is not None}
                    )
            else:
                params = SearchRequest.model_validate(_json_body(await request.body()))
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None
        return params, upload

    # ---- routes -------------------------------------------------------------------------------

    @app.post(
        "/search",
        response_model=SearchResponse,
        summary="Search by image, vector or id",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/SearchRequest"}},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "file": {"type": "string", "format": "binary"},
                                "k": {"type": "integer"},
                                "bits": {"type": "integer"},
                                "offset": {"type": "integer"},
                                "rerank": {"type": "integer"},
                            },
                            "required": ["file"],
                        }
                    },
                },
            }
        },
    )
    async def search(request: Request) -> Response:
        """Ranks `offset`..`offset + k - 1` of the collection for one query, ranked with the
        first `bits` of every code (the same index answers at every code length).
        JSON body: a SearchRequest. Multipart: field `file` plus the same fields as form
        fields."""
        started = time.perf_counter()
        params, upload = await parse_search(request)
        body = await workers.run(workers.search_pool, lambda: run_search(params, upload, started))
        return JSONResponse(body)

    @app.get("/items/random", summary="A random item")
    async def random_item() -> dict[str, Any]:
        def pick() -> dict[str, Any]:
            item_id = collection.random_id(np.random.default_rng())
            if item_id is None:
                raise HTTPException(404, "the collection is empty.")
            return _item_body(collection, item_id)

        return await workers.run(workers.search_pool, pick)

    @app.get("/items/{item_id}", summary="An item's label and metadata")
    async def get_item(item_id: int) -> dict[str, Any]:
        return await workers.run(workers.search_pool, lambda: _item_body(collection, item_id))

    @app.get(
        "/items/{item_id}/image",
        summary="An item's image as a thumbnail (PNG)",
        responses={200: {"content": {"image/png": {}}}},
    )
    async def get_item_image(item_id: int) -> Response:
        png = await workers.run(workers.search_pool, lambda: collection.thumbnail(item_id))
        if png is None:
            if collection.item(item_id) is None:
                raise HTTPException(404, f"no item with id {item_id} in this collection.")
            raise HTTPException(
                404,
                f"item {item_id} has no stored image (the index was built from features, or "
                "the service was started without --images).",
            )
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.post(
        "/items",
        status_code=201,
        response_model=AddResponse,
        summary="Add items (images through the model, or vectors)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/AddRequest"}},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "files": {
                                    "type": "array",
                                    "items": {"type": "string", "format": "binary"},
                                },
                                "labels": {"type": "array", "items": {"type": "string"}},
                            },
                            "required": ["files"],
                        }
                    },
                },
            }
        },
    )
    async def add_items(request: Request) -> Response:
        """Encode the items, add them as one batch, and answer 201 once the batch is durable
        (journal fsynced; it survives kill -9). Needs the API key when one is set."""
        require_key(request)
        kind = request.headers.get("content-type", "")
        uploads: list[tuple[bytes, str]] = []
        try:
            if kind.startswith("multipart/form-data"):
                async with request.form(max_files=1000) as form:
                    for value in form.getlist("files") + form.getlist("file"):
                        if isinstance(value, UploadFile):
                            uploads.append((await value.read(), value.filename or "upload"))
                    labels = [None if v == "" else v for v in form.getlist("labels")]
                    body = AddRequest(labels=labels or None)
            else:
                body = AddRequest.model_validate(_json_body(await request.body()))
                uploads = [
                    (_b64(b, f"images[{i}]"), f"images[{i}]")
                    for i, b in enumerate(body.images or [])
                ]
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None

        def prepare() -> tuple[np.ndarray, list[Any] | None, list[str | None]]:
            if bool(uploads) == (body.vectors is not None):
                raise ValueError("give either images (files or base64 'images') or 'vectors'.")
            if body.vectors is not None:
                vectors = np.asarray(body.vectors, np.float32)
                if vectors.ndim != 2 or vectors.shape[1] != collection.index.dim:
                    raise ValueError(
                        f"vectors must be a list of lists of {collection.index.dim} numbers "
                        f"(the index's feature dimension); got shape {vectors.shape}."
                    )
                return vectors, None, list(body.names or [None] * len(vectors))
            decoded = [image_array(data, name) for data, name in uploads]
            with metrics.stage("encode"):
                feats = collection.features_of_images([pixels for pixels, _ in decoded])
            return feats, [picture for _, picture in decoded], [name for _, name in uploads]

        features, pictures, names = await workers.run(workers.search_pool, prepare)

        def write() -> np.ndarray:
            with metrics.stage("write"):
                return collection.add(features, labels=body.labels, images=pictures, names=names)

        ids = await workers.run(workers.write_pool, write)
        return JSONResponse({"ids": ids.tolist(), "items": len(collection)}, status_code=201)

    @app.delete("/items/{item_id}", summary="Remove an item")
    async def delete_item(item_id: int, request: Request) -> dict[str, Any]:
        """Remove one item; durable once answered. Needs the API key when one is set."""
        require_key(request)

        def write() -> bool:
            with metrics.stage("write"):
                return collection.remove(item_id)

        if not await workers.run(workers.write_pool, write):
            raise HTTPException(404, f"no item with id {item_id} in this collection.")
        return {"deleted": item_id, "items": len(collection)}

    @app.get("/health", summary="Liveness")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "items": len(collection)}

    @app.get("/stats", summary="Collection facts: items, code lengths, hashes")
    async def stats() -> dict[str, Any]:
        facts = await workers.run(workers.search_pool, collection.stats)
        return {**facts, "writes_need_api_key": api_key is not None}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # outermost first: metrics see every answer, including the limits' 413 and 429
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)
    if rate_limit:
        buckets = TokenBuckets(rate_limit, rate_burst or max(1, int(2 * rate_limit)), clock=clock)
        app.add_middleware(RateLimit, buckets=buckets, exempt=("/health", "/metrics", "/static"))
    app.add_middleware(_RequestMetrics, metrics=metrics, routes=lambda: app.router.routes)
    return app


def _json_body(raw: bytes) -> Any:
    if not raw:
        raise ValueError("the request has no body; send JSON (or a multipart image upload).")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the request body is not valid JSON: {exc}") from None


def _search_body(
    collection: Collection,
    hits: SearchHits,
    params: SearchRequest,
    query: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    results = []
    labels = hits.labels
    for i, (item_id, distance) in enumerate(
        zip(hits.ids.tolist(), hits.distances.tolist(), strict=True)
    ):
        results.append(
            {
                "id": item_id,
                "distance": float(f"{distance:.6g}"),
                "label": None if labels is None else labels[i],
                "image_url": f"/items/{item_id}/image" if collection.has_image(item_id) else None,
            }
        )
    return {
        "results": results,
        "bits": hits.bits,
        "took_ms": round((time.perf_counter() - started) * 1000, 3),
        "k": params.k,
        "offset": params.offset,
        "total": hits.total,
        "query": query,
    }


def _item_body(collection: Collection, item_id: int) -> dict[str, Any]:
    item = collection.item(item_id)
    if item is None:
        raise HTTPException(404, f"no item with id {item_id} in this collection.")
    item["image_url"] = f"/items/{item_id}/image" if item.pop("has_image") else None
    return item
