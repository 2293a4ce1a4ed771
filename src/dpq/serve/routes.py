"""The HTTP routes, on one :class:`fastapi.APIRouter`: search, items (read, add, delete),
service facts (health, stats, metrics) and the web page.

Each route gets its app's :class:`~dpq.serve.context.ServiceContext` through a FastAPI
dependency and runs the work on its workers (searches, decoding and model calls on the
search pool, writes on the single writer thread), never on the event loop. A ``ValueError``
raised here or below answers 422, a :class:`~dpq.serve.images.NotAnImageError` 415 (the
app's exception handlers).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from dpq.serve.bounds import MAX_ID, MAX_IMAGES_PER_REQUEST, MAX_RESULTS
from dpq.serve.collection import SearchHits
from dpq.serve.context import ServiceContext, check_write, service_context
from dpq.serve.images import decode_upload, model_input
from dpq.serve.labels import label_filter
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
    SearchOptions,
    SearchRequest,
    SearchResponse,
)

__all__ = ["STATIC_DIR", "router"]

STATIC_DIR = Path(__file__).parent / "static"

router = APIRouter()
Service = Annotated[ServiceContext, Depends(service_context)]
ItemIdPath = Annotated[int, PathParam(ge=0, le=MAX_ID, description="an item id (int64, >= 0)")]
Upload = tuple[bytes, str]  # (file bytes, a name for messages)
_INTEGER = re.compile(r"-?[0-9]+")
_NOT_FOUND = {404: {"description": "no item with that id"}}


# ---------------------------------------------------------------- reading request bodies


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _json_body(request: Request) -> Any:
    """The JSON of a request whose Content-Type is application/json (415 otherwise: a JSON
    body sent as text/plain or form-encoded is what another site's page can send)."""
    if _media_type(request) != "application/json":
        raise HTTPException(
            415,
            f"send JSON with Content-Type: application/json (got "
            f"{_media_type(request) or 'no Content-Type'}), or a multipart image upload.",
        )
    raw = await request.body()
    if not raw:
        raise ValueError("the request has no body; send JSON (or a multipart image upload).")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the request body is not valid JSON: {exc}") from None


def _validated(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def _b64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(
            data.split(",", 1)[1] if data.startswith("data:") else data, validate=True
        )
    except (binascii.Error, ValueError):
        raise ValueError(
            f"{what} is not valid base64; send the file's bytes base64-encoded."
        ) from None


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
            (_b64(b, f"images[{i}]"), f"images[{i}]") for i, b in enumerate(body.images or [])
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


def _image_array(service: ServiceContext, upload: Upload) -> tuple[np.ndarray, Any]:
    """(model input uint8 (H, W, 3), decoded image) of uploaded bytes; times 'decode'."""
    collection = service.collection
    if not collection.accepts_images or collection.image_size is None:
        raise ValueError(
            "this service has no model, so it cannot take images; send a vector or an "
            "id, or restart it with --model."
        )
    data, name = upload
    with service.metrics.stage("decode"):
        picture = decode_upload(data, name, service.settings.max_image_pixels)
        return model_input(picture, collection.image_size), picture


def _vector(service: ServiceContext, values: list[float]) -> np.ndarray:
    vector = np.asarray(values, np.float32)
    if vector.shape != (service.collection.index.dim,):
        raise ValueError(
            f"the vector has {vector.size} values but this index expects "
            f"{service.collection.index.dim} (its feature dimension D)."
        )
    return vector


def _query_vector(
    service: ServiceContext, params: SearchRequest, upload: Upload | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """float32 (D,) query of exactly one of an upload, base64 image, vector or id, and the
    answer's ``query`` field (the id and its label for an id query; what the model predicts
    for an image)."""
    collection = service.collection
    given = [params.image is not None or upload is not None, params.vector is not None]
    given.append(params.id is not None)
    if sum(given) != 1:
        raise ValueError(
            "give exactly one query: an uploaded image, 'image' (base64), 'vector' or 'id'."
        )
    if params.id is not None:
        vector = collection.vectors_of([params.id])[0]
        return vector, {"id": params.id, "label": collection.label_of(params.id)}
    if params.vector is not None:
        return _vector(service, params.vector), {}
    if upload is None:
        upload = (_b64(params.image or "", "image"), "image")
    pixels, _ = _image_array(service, upload)
    with service.metrics.stage("encode"):
        multi_label = collection.index.label_shape not in (None, ())
        features, predictions = collection.model().predictions(
            pixels[None], multi_label, collection.classes
        )
    return features[0], predictions[0]


def _search_pages(
    service: ServiceContext,
    vectors: np.ndarray,
    query_ids: list[int | None],
    params: SearchOptions,
) -> list[SearchHits]:
    """Pages of float32 (nq, D) queries with the options of a request; an id query leaves
    its own item out when ``exclude_query`` (the default)."""
    collection = service.collection
    chosen = None
    if params.filter is not None:
        chosen = label_filter(
            params.filter.labels,
            params.filter.match,
            collection.index.label_shape,
            collection.classes,
        )
    exclude = None
    own = [query_id is not None and params.exclude_query for query_id in query_ids]
    if params.exclude or any(own):
        base = list(params.exclude or [])
        exclude = [
            base + [query_id] if mine else base
            for query_id, mine in zip(query_ids, own, strict=True)
        ]
    with service.metrics.stage("search"):
        return collection.search_many(
            vectors,
            k=params.k,
            bits=params.bits,
            offset=params.offset,
            rerank=params.rerank,
            rerank_candidates=params.rerank_candidates,
            nprobe=params.nprobe,
            label_filter=chosen,
            exclude=exclude,
            with_codes=params.with_codes,
        )


def _page_body(service: ServiceContext, hits: SearchHits, query: dict[str, Any]) -> dict[str, Any]:
    """The JSON of one query's QueryResults."""
    results = []
    for i, (item_id, distance) in enumerate(
        zip(hits.ids.tolist(), hits.distances.tolist(), strict=True)
    ):
        has_image = service.collection.has_image(item_id)
        result = {
            "rank": hits.offset + i,
            "id": item_id,
            "distance": float(f"{distance:.6g}"),
            "label": None if hits.labels is None else hits.labels[i],
            "image_url": f"/items/{item_id}/image" if has_image else None,
        }
        if hits.codes is not None:
            result["codes"] = hits.codes[i].tolist()
        results.append(result)
    groups = [
        {
            "start": g.start,
            "end": g.end,
            "distance": float(f"{g.distance:.6g}"),
            "complete": g.complete,
        }
        for g in hits.tie_groups
    ]
    return {"results": results, "tie_groups": groups, "query": query}


def _answer_facts(hits: SearchHits, params: SearchOptions, started: float) -> dict[str, Any]:
    return {
        "bits": hits.bits,
        "took_ms": round((time.perf_counter() - started) * 1000, 3),
        "k": params.k,
        "offset": params.offset,
        "total": hits.total,
        "matching": hits.matching,
    }


def _run_search(
    service: ServiceContext, params: SearchRequest, upload: Upload | None, started: float
) -> dict[str, Any]:
    vector, query = _query_vector(service, params, upload)
    hits = _search_pages(service, vector[None], [params.id], params)[0]
    return {**_page_body(service, hits, query), **_answer_facts(hits, params, started)}


def _run_batch(
    service: ServiceContext, params: BatchSearchRequest, started: float
) -> dict[str, Any]:
    collection = service.collection
    for number, one in enumerate(params.queries):
        if (one.vector is None) == (one.id is None):
            raise ValueError(f"queries[{number}] must give exactly one of 'vector' or 'id'.")
    ids = [one.id for one in params.queries if one.id is not None]
    by_id = dict(zip(ids, collection.vectors_of(ids), strict=True)) if ids else {}
    vectors = np.stack(
        [
            by_id[one.id] if one.id is not None else _vector(service, one.vector)
            for one in params.queries
        ]
    )
    query_ids = [one.id for one in params.queries]
    pages = _search_pages(service, vectors, query_ids, params)
    responses = [
        _page_body(
            service,
            hits,
            {} if query_id is None else {"id": query_id, "label": collection.label_of(query_id)},
        )
        for hits, query_id in zip(pages, query_ids, strict=True)
    ]
    return {"responses": responses, **_answer_facts(pages[0], params, started)}


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
    decoded = [_image_array(service, upload) for upload in uploads]
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
    body = await service.workers.search(lambda: _run_search(service, params, upload, started))
    return JSONResponse(body)


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
    body = await service.workers.search(lambda: _run_batch(service, params, started))
    return JSONResponse(body)


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
    return JSONResponse({"ids": ids.tolist(), "items": len(service.collection)}, status_code=201)


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
