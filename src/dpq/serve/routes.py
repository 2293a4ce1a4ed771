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
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from dpq.serve.bounds import MAX_IMAGES_PER_REQUEST
from dpq.serve.collection import SearchHits
from dpq.serve.context import ServiceContext, require_api_key, service_context
from dpq.serve.images import decode_upload, model_input
from dpq.serve.schemas import (
    ADD_REQUEST_BODY,
    SEARCH_FORM_FIELDS,
    SEARCH_REQUEST_BODY,
    AddRequest,
    AddResponse,
    SearchRequest,
    SearchResponse,
)

__all__ = ["STATIC_DIR", "router"]

STATIC_DIR = Path(__file__).parent / "static"

router = APIRouter()
Service = Annotated[ServiceContext, Depends(service_context)]
Upload = tuple[bytes, str]  # (file bytes, a name for messages)


# ---------------------------------------------------------------- reading request bodies


def _json_body(raw: bytes) -> Any:
    if not raw:
        raise ValueError("the request has no body; send JSON (or a multipart image upload).")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the request body is not valid JSON: {exc}") from None


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


async def _search_request(request: Request) -> tuple[SearchRequest, Upload | None]:
    """The SearchRequest of a JSON body, or of a multipart form (with its uploaded file)."""
    upload = None
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            async with request.form(max_files=1) as form:
                file = form.get("file") or form.get("image")
                if isinstance(file, UploadFile):
                    upload = (await file.read(), file.filename or "upload")
                fields = {name: _int_field(form, name) for name in SEARCH_FORM_FIELDS}
                params = SearchRequest.model_validate(
                    {name: value for name, value in fields.items() if value is not None}
                )
        else:
            params = SearchRequest.model_validate(_json_body(await request.body()))
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    return params, upload


async def _add_request(request: Request) -> tuple[AddRequest, list[Upload]]:
    """The AddRequest of a JSON body (base64 images decoded), or of a multipart form with
    its uploaded files."""
    uploads: list[Upload] = []
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            async with request.form(max_files=MAX_IMAGES_PER_REQUEST) as form:
                for value in form.getlist("files") + form.getlist("file"):
                    if isinstance(value, UploadFile):
                        uploads.append((await value.read(), value.filename or "upload"))
                labels = [None if v == "" else v for v in form.getlist("labels")]
                body = AddRequest(labels=labels or None)
        else:
            body = AddRequest.model_validate(_json_body(await request.body()))
            uploads = [
                (_b64(b, f"images[{i}]"), f"images[{i}]") for i, b in enumerate(body.images or [])
            ]
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    return body, uploads


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


def _query_vector(
    service: ServiceContext, params: SearchRequest, upload: Upload | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """float32 (D,) query of exactly one of an upload, base64 image, vector or id, and the
    answer's ``query`` field (the id and its label for an id query)."""
    collection = service.collection
    given = [params.image is not None or upload is not None, params.vector is not None]
    given.append(params.id is not None)
    if sum(given) != 1:
        raise ValueError(
            "give exactly one query: an uploaded image, 'image' (base64), 'vector' or 'id'."
        )
    if params.id is not None:
        vector = collection.vector_of(params.id)
        if vector is None:
            raise HTTPException(404, f"no item with id {params.id} in this collection.")
        return vector, {"id": params.id, "label": collection.label_of(params.id)}
    if params.vector is not None:
        vector = np.asarray(params.vector, np.float32)
        if vector.shape != (collection.index.dim,):
            raise ValueError(
                f"the vector has {vector.size} values but this index expects "
                f"{collection.index.dim} (its feature dimension D)."
            )
        return vector, {}
    if upload is None:
        upload = (_b64(params.image or "", "image"), "image")
    pixels, _ = _image_array(service, upload)
    with service.metrics.stage("encode"):
        return collection.features_of_images([pixels])[0], {}


def _run_search(
    service: ServiceContext, params: SearchRequest, upload: Upload | None, started: float
) -> dict[str, Any]:
    vector, query = _query_vector(service, params, upload)
    with service.metrics.stage("search"):
        hits = service.collection.search(
            vector,
            k=params.k,
            bits=params.bits,
            offset=params.offset,
            rerank=params.rerank,
            rerank_candidates=params.rerank_candidates,
            nprobe=params.nprobe,
        )
    return _search_body(service, hits, params, query, started)


def _search_body(
    service: ServiceContext,
    hits: SearchHits,
    params: SearchRequest,
    query: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """The JSON of a SearchResponse."""
    results = []
    labels = hits.labels
    for i, (item_id, distance) in enumerate(
        zip(hits.ids.tolist(), hits.distances.tolist(), strict=True)
    ):
        has_image = service.collection.has_image(item_id)
        results.append(
            {
                "id": item_id,
                "distance": float(f"{distance:.6g}"),
                "label": None if labels is None else labels[i],
                "image_url": f"/items/{item_id}/image" if has_image else None,
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


def _item_body(service: ServiceContext, item_id: int) -> dict[str, Any]:
    item = service.collection.item(item_id)
    if item is None:
        raise HTTPException(404, f"no item with id {item_id} in this collection.")
    item["image_url"] = f"/items/{item_id}/image" if item.pop("has_image") else None
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
        return vectors, None, list(body.names or [None] * len(vectors))
    decoded = [_image_array(service, upload) for upload in uploads]
    with service.metrics.stage("encode"):
        features = collection.features_of_images([pixels for pixels, _ in decoded])
    return features, [picture for _, picture in decoded], [name for _, name in uploads]


# ---------------------------------------------------------------- search


@router.post(
    "/search",
    response_model=SearchResponse,
    summary="Search by image, vector or id",
    openapi_extra={"requestBody": SEARCH_REQUEST_BODY},
)
async def search(request: Request, service: Service) -> Response:
    """Ranks `offset`..`offset + k - 1` of the collection for one query, ranked with the
    first `bits` of every code (the same index answers at every code length).
    JSON body: a SearchRequest. Multipart: field `file` plus the same fields as form
    fields."""
    started = time.perf_counter()
    params, upload = await _search_request(request)
    body = await service.workers.search(lambda: _run_search(service, params, upload, started))
    return JSONResponse(body)


# ---------------------------------------------------------------- items


@router.get("/items/random", summary="A random item")
async def random_item(service: Service) -> dict[str, Any]:
    def pick() -> dict[str, Any]:
        item_id = service.collection.random_id(np.random.default_rng())
        if item_id is None:
            raise HTTPException(404, "the collection is empty.")
        return _item_body(service, item_id)

    return await service.workers.search(pick)


@router.get("/items/{item_id}", summary="An item's label and metadata")
async def get_item(item_id: int, service: Service) -> dict[str, Any]:
    return await service.workers.search(lambda: _item_body(service, item_id))


@router.get(
    "/items/{item_id}/image",
    summary="An item's image as a thumbnail (PNG)",
    responses={200: {"content": {"image/png": {}}}},
)
async def get_item_image(item_id: int, service: Service) -> Response:
    collection = service.collection
    png = await service.workers.search(lambda: collection.thumbnail(item_id))
    if png is None:
        if collection.item(item_id) is None:
            raise HTTPException(404, f"no item with id {item_id} in this collection.")
        raise HTTPException(
            404,
            f"item {item_id} has no stored image (the index was built from features, or "
            "the service was started without --images).",
        )
    return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})


@router.post(
    "/items",
    status_code=201,
    response_model=AddResponse,
    summary="Add items (images through the model, or vectors)",
    openapi_extra={"requestBody": ADD_REQUEST_BODY},
)
async def add_items(request: Request, service: Service) -> Response:
    """Encode the items, add them as one batch, and answer 201 once the batch is durable
    (journal fsynced; it survives kill -9). Needs the API key when one is set."""
    require_api_key(request, service.settings.api_key)
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


@router.delete("/items/{item_id}", summary="Remove an item")
async def delete_item(item_id: int, request: Request, service: Service) -> dict[str, Any]:
    """Remove one item; durable once answered. Needs the API key when one is set."""
    require_api_key(request, service.settings.api_key)

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


@router.get("/stats", summary="Collection facts: items, code lengths, hashes")
async def stats(service: Service) -> dict[str, Any]:
    facts = await service.workers.search(service.collection.stats)
    return {**facts, "writes_need_api_key": service.settings.api_key is not None}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus(service: Service) -> Response:
    body, media_type = service.metrics.exposition()
    return Response(body, media_type=media_type)


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})
