"""The HTTP routes, on one :class:`fastapi.APIRouter`: search, items (read, add, delete),
service facts (health, stats, metrics) and the web page.

Each route gets its app's :class:`~dpq.serve.context.ServiceContext` through a FastAPI
dependency and runs the work on its workers (searches, decoding and model calls on the
search pool, writes on the single writer thread), never on the event loop; single searches
go through the app's micro-batcher (:mod:`dpq.serve.batching`), which searches the queries
that arrive together in one call (:mod:`dpq.serve.searches`). A ``ValueError``
raised here or below answers 422, a :class:`~dpq.serve.images.NotAnImageError` 415 (the
app's exception handlers).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from dpq.serve.bounds import MAX_ID, MAX_IMAGES_PER_REQUEST, MAX_RESULTS
from dpq.serve.context import ServiceContext, check_write, service_context
from dpq.serve.images import decode_base64
from dpq.serve.json_codec import JSON_MEDIA_TYPE, FastJSONResponse, media_type, parse_json
from dpq.serve.schemas import (
    ADD_REQUEST_BODY,
    BATCH_REQUEST_BODY,
    SEARCH_FORM_FIELDS,
    SEARCH_REQUEST_BODY,
    AddRequest,
    AddResponse,
    BatchSearchRequest,
    BatchSearchResponse,
    Item,
    ItemList,
    SearchRequest,
    SearchResponse,
)
from dpq.serve.searches import Upload, answer_batch, answer_search, image_input

__all__ = ["STATIC_DIR", "router", "search"]

STATIC_DIR = Path(__file__).parent / "static"

router = APIRouter()
Service = Annotated[ServiceContext, Depends(service_context)]
ItemIdPath = Annotated[int, PathParam(ge=0, le=MAX_ID, description="an item id (int64, >= 0)")]
_INTEGER = re.compile(r"-?[0-9]+")
_NOT_FOUND = {404: {"description": "no item with that id"}}


# ---------------------------------------------------------------- reading request bodies


def _media_type(request: Request) -> str:
    return media_type(request.headers.get("content-type", ""))


async def _json_body(request: Request) -> Any:
    """The JSON of a request whose Content-Type is application/json (415 otherwise: a JSON
    body sent as text/plain or form-encoded is what another site's page can send)."""
    if _media_type(request) != JSON_MEDIA_TYPE:
        raise HTTPException(
            415,
            f"send JSON with Content-Type: application/json (got "
            f"{_media_type(request) or 'no Content-Type'}), or a multipart image upload.",
        )
    raw = await request.body()
    if not raw:
        raise ValueError("the request has no body; send JSON (or a multipart image upload).")
    return parse_json(raw)


def _validated(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def _form_value(form: Any, name: str) -> Any:
    """A multipart form field as its JSON value: integers for the integer fields, the
    parsed JSON of ``filter``, true/false for ``with_codes`` (None when absent)."""
    value = form.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, UploadFile):
        raise ValueError(f"form field {name!r} must be a value, not a file.")
    if name == "filter":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(
                'form field \'filter\' must be JSON, such as {"labels": ["cat"]}.'
            ) from None
    if name in ("with_codes", "exclude_query"):
        return {"true": True, "false": False}.get(value.lower(), value)
    return int(value) if _INTEGER.fullmatch(value) else value  # strict validation says what


async def _search_request(request: Request) -> tuple[SearchRequest, Upload | None]:
    """The SearchRequest of a JSON body, or of a multipart form (with its uploaded file)."""
    if _media_type(request) != "multipart/form-data":
        return _validated(SearchRequest, await _json_body(request)), None
    upload = None
    async with request.form(max_files=1) as form:
        file = form.get("file") or form.get("image")
        if isinstance(file, UploadFile):
            upload = (await file.read(), file.filename or "upload")
        names = (*SEARCH_FORM_FIELDS, "filter", "with_codes", "exclude_query")
        fields = {name: _form_value(form, name) for name in names}
    params = {name: value for name, value in fields.items() if value is not None}
    return _validated(SearchRequest, params), upload


async def _add_request(request: Request) -> tuple[AddRequest, list[Upload]]:
    """The AddRequest of a JSON body (base64 images decoded), or of a multipart form with
    its uploaded files."""
    if _media_type(request) != "multipart/form-data":
        body = _validated(AddRequest, await _json_body(request))
        uploads = [
            (decode_base64(b, f"images[{i}]"), f"images[{i}]")
            for i, b in enumerate(body.images or [])
        ]
        return body, uploads
    uploads: list[Upload] = []
    async with request.form(max_files=MAX_IMAGES_PER_REQUEST) as form:
        for value in form.getlist("files") + form.getlist("file"):
            if isinstance(value, UploadFile):
                uploads.append((await value.read(), value.filename or "upload"))
        labels = [None if v == "" else v for v in form.getlist("labels")]
    return _validated(AddRequest, {"labels": labels or None}), uploads


# ---------------------------------------------------------------- work on the worker threads


def _item_body(service: ServiceContext, item_id: int) -> dict[str, Any]:
    item = service.collection.item(item_id)
    if item is None:
        raise HTTPException(404, f"no item with id {item_id} in this collection.")
    return _item_urls(item)


def _item_urls(item: dict[str, Any]) -> dict[str, Any]:
    item_id = item["id"]
    item["image_url"] = f"/items/{item_id}/image" if item.pop("has_image") else None
    full = item.pop("has_full_image")
    item["full_image_url"] = f"/items/{item_id}/image/full" if full else None
    return item


def _items_to_add(
    service: ServiceContext, body: AddRequest, uploads: list[Upload]
) -> tuple[np.ndarray, list[Any] | None, list[str | None]]:
    """(float32 (n, D) features, pictures to keep as thumbnails or None, names) of the
    vectors or the images of an add."""
    collection = service.collection
    if bool(uploads) == (body.vectors is not None):
        raise ValueError("give either images (files or base64 'images') or 'vectors'.")
    if body.vectors is not None:
        vectors = np.asarray(body.vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != collection.index.dim:
            raise ValueError(
                f"vectors must be a list of lists of {collection.index.dim} numbers "
                f"(the index's feature dimension); got shape {vectors.shape}."
            )
        with np.errstate(over="ignore"):
            if not np.isfinite(np.einsum("nd,nd->n", vectors, vectors)).all():
                raise ValueError(
                    "a vector holds values too large for 32-bit floats (or NaN/inf); scale "
                    "the vectors down (features are of the order of 1)."
                )
        return vectors, None, list(body.names or [None] * len(vectors))
    decoded = [image_input(service, upload) for upload in uploads]
    with service.metrics.stage("encode"):
        features = collection.model().features(np.stack([pixels for pixels, _ in decoded]))
    return features, [picture for _, picture in decoded], [name for _, name in uploads]


# ---------------------------------------------------------------- search


@router.post(
    "/search",
    response_model=SearchResponse,
    summary="Search by image, vector or id",
    openapi_extra={"requestBody": SEARCH_REQUEST_BODY},
    responses={**_NOT_FOUND, 415: {"description": "not JSON or multipart, or not an image"}},
)
async def search(request: Request, service: Service) -> Response:
    """Ranks `offset`..`offset + k - 1` of the collection for one query, ranked with the
    first `bits` of every code (the same index answers at every code length). Results at
    equal distance are tied: `tie_groups` says where, and their order is a hash of query
    and id. `filter` searches among labels, `exclude` leaves ids out (an id query leaves
    itself out unless `exclude_query` is false).
    JSON body: a SearchRequest. Multipart: field `file` plus the same fields as form
    fields (`filter` as JSON text)."""
    started = time.perf_counter()
    params, upload = await _search_request(request)
    return FastJSONResponse(await answer_search(service, params, upload, started))


@router.post(
    "/search/batch",
    response_model=BatchSearchResponse,
    summary="Search with several vectors or ids at once",
    openapi_extra={"requestBody": BATCH_REQUEST_BODY},
    responses={**_NOT_FOUND, 415: {"description": "not JSON"}},
)
async def search_batch(request: Request, service: Service) -> Response:
    """One page per query of `queries` (each a `vector` or an `id`), the options applying to
    each, answered by one search of the index (queries share its scan)."""
    started = time.perf_counter()
    params = _validated(BatchSearchRequest, await _json_body(request))
    body = await service.workers.search(lambda: answer_batch(service, params, started))
    return FastJSONResponse(body)


# ---------------------------------------------------------------- items


@router.get("/items", response_model=ItemList, summary="Items in id order (paged)")
async def list_items(
    service: Service,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_RESULTS)] = 100,
) -> dict[str, Any]:
    def page() -> dict[str, Any]:
        items, total = service.collection.items(offset, limit)
        return {"items": [_item_urls(item) for item in items], "offset": offset, "limit": limit,
                "total": total}  # fmt: skip

    return await service.workers.search(page)


@router.get("/items/random", response_model=Item, summary="A random item")
async def random_item(service: Service) -> dict[str, Any]:
    def pick() -> dict[str, Any]:
        item_id = service.collection.random_id(np.random.default_rng())
        if item_id is None:
            raise HTTPException(404, "the collection is empty.")
        return _item_body(service, item_id)

    return await service.workers.search(pick)


@router.get(
    "/items/{item_id}",
    response_model=Item,
    summary="An item's label and metadata",
    responses=_NOT_FOUND,
)
async def get_item(item_id: ItemIdPath, service: Service) -> dict[str, Any]:
    return await service.workers.search(lambda: _item_body(service, item_id))


def _no_image(service: ServiceContext, item_id: int, what: str) -> HTTPException:
    if service.collection.item(item_id) is None:
        return HTTPException(404, f"no item with id {item_id} in this collection.")
    return HTTPException(404, f"item {item_id} has no stored image {what}.")


@router.get(
    "/items/{item_id}/image",
    summary="An item's image as a thumbnail (PNG)",
    responses={200: {"content": {"image/png": {}}}, **_NOT_FOUND},
)
async def get_item_image(item_id: ItemIdPath, service: Service) -> Response:
    png = await service.workers.search(lambda: service.collection.thumbnail(item_id))
    if png is None:
        raise _no_image(
            service,
            item_id,
            "(the index was built from features, or the service was started without --images)",
        )
    return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})


@router.get(
    "/items/{item_id}/image/full",
    summary="An item's image at its own size (PNG)",
    responses={200: {"content": {"image/png": {}}}, **_NOT_FOUND},
)
async def get_item_full_image(item_id: ItemIdPath, service: Service) -> Response:
    """The item's image file decoded anew at its own size; items of the source only (an
    upload keeps only its thumbnail)."""
    png = await service.workers.search(lambda: service.collection.full_image(item_id))
    if png is None:
        raise _no_image(
            service,
            item_id,
            "at full size (only items of the source given with --images have one; an "
            "upload keeps its thumbnail only)",
        )
    return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})


@router.post(
    "/items",
    status_code=201,
    response_model=AddResponse,
    summary="Add items (images through the model, or vectors)",
    openapi_extra={"requestBody": ADD_REQUEST_BODY},
    responses={
        401: {"description": "the API key is missing or wrong"},
        403: {"description": "writes are closed, or the request comes from another site"},
        415: {"description": "not JSON or multipart, or not an image"},
        503: {"description": "the write could not be stored (e.g. the disk is full)"},
    },
)
async def add_items(request: Request, service: Service) -> Response:
    """Encode the items, add them as one batch, and answer 201 once the batch is durable
    (journal fsynced; it survives kill -9). Needs the API key when one is set, or a
    service started with --allow-open-writes; never from another site's page."""
    check_write(request, service.settings)
    body, uploads = await _add_request(request)
    features, pictures, names = await service.workers.search(
        lambda: _items_to_add(service, body, uploads)
    )

    def write() -> np.ndarray:
        with service.metrics.stage("write"):
            return service.collection.add(
                features, labels=body.labels, images=pictures, names=names
            )

    ids = await service.workers.write(write)
    return FastJSONResponse(
        {"ids": ids.tolist(), "items": len(service.collection)}, status_code=201
    )


@router.delete(
    "/items/{item_id}",
    summary="Remove an item",
    responses={**_NOT_FOUND, 401: {"description": "the API key is missing or wrong"},
               403: {"description": "writes are closed, or the request comes from another site"},
               503: {"description": "the removal could not be stored"}},
)  # fmt: skip
async def delete_item(item_id: ItemIdPath, request: Request, service: Service) -> dict[str, Any]:
    """Remove one item; durable once answered. Needs what a write needs (see POST /items)."""
    check_write(request, service.settings)

    def write() -> bool:
        with service.metrics.stage("write"):
            return service.collection.remove(item_id)

    if not await service.workers.write(write):
        raise HTTPException(404, f"no item with id {item_id} in this collection.")
    return {"deleted": item_id, "items": len(service.collection)}


# ---------------------------------------------------------------- the service and the page


@router.get("/health", summary="Liveness")
async def health(service: Service) -> dict[str, Any]:
    return {"status": "ok", "items": len(service.collection)}


@router.get("/stats", summary="Collection facts: items, code lengths, code usage, hashes")
async def stats(service: Service) -> dict[str, Any]:
    """Facts of the collection; `code_usage` says how its items use their codes (per level:
    codewords used, perplexity, distinct prefixes) and `warnings` what looks degenerate
    (collapsed codes: searches then rank large groups of tied items)."""
    facts = await service.workers.search(service.collection.stats)
    return {
        **facts,
        "warnings": facts["code_usage"]["warnings"],
        "writes": service.settings.writes,
        "writes_need_api_key": service.settings.api_key is not None,
    }


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus(service: Service) -> Response:
    body, media_type = service.metrics.exposition()
    return Response(body, media_type=media_type)


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})
