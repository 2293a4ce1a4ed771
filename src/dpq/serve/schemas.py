"""The JSON bodies of the HTTP API (pydantic models) and how they appear in its OpenAPI
description. The bounds they declare come from :mod:`dpq.serve.bounds`.

``/search`` and ``POST /items`` take JSON or a multipart upload, so their routes read the
body themselves and FastAPI does not see these request models; :func:`request_schemas`
gives their schemas for the description's components, so the routes' ``$ref`` resolve.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from dpq.serve.bounds import (
    MAX_IMAGES_PER_REQUEST,
    MAX_NPROBE,
    MAX_OFFSET,
    MAX_RERANK_CANDIDATES,
    MAX_RESULTS,
    MAX_VECTORS_PER_REQUEST,
)

__all__ = [
    "ADD_REQUEST_BODY",
    "AddRequest",
    "AddResponse",
    "REQUEST_MODELS",
    "SEARCH_FORM_FIELDS",
    "SEARCH_REQUEST_BODY",
    "SearchRequest",
    "SearchResponse",
    "SearchResult",
    "request_schemas",
]

COMPONENTS = "#/components/schemas/"


class SearchRequest(BaseModel):
    """A query: exactly one of ``image`` (base64 file bytes), ``vector`` (D floats) or ``id``
    (an item in the collection, searched with the reconstruction of its code)."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description="base64 of an image file (needs a model)")
    vector: list[float] | None = Field(None, description="a query feature vector of length D")
    id: int | None = Field(None, description="search with this item's reconstructed vector")
    k: int = Field(20, ge=1, le=MAX_RESULTS, description="results to return")
    offset: int = Field(0, ge=0, le=MAX_OFFSET, description="skip this many ranks (paging)")
    bits: int | None = Field(None, description="code length to rank with (default: all levels)")
    rerank: int | None = Field(
        None, description="shortlist with this shorter code length, then re-rank with `bits`"
    )
    rerank_candidates: int | None = Field(
        None, ge=1, le=MAX_RERANK_CANDIDATES, description="shortlist size"
    )
    nprobe: int | None = Field(
        None, ge=1, le=MAX_NPROBE, description="partitions to visit (partitioned indexes)"
    )


# The integer fields of SearchRequest a multipart search may send as form fields.
SEARCH_FORM_FIELDS = ("k", "offset", "bits", "rerank", "rerank_candidates", "nprobe", "id")


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

    vectors: list[list[float]] | None = Field(None, max_length=MAX_VECTORS_PER_REQUEST)
    images: list[str] | None = Field(None, max_length=MAX_IMAGES_PER_REQUEST)
    labels: list[Any] | None = Field(None, max_length=MAX_VECTORS_PER_REQUEST)
    names: list[str | None] | None = Field(None, max_length=MAX_VECTORS_PER_REQUEST)


class AddResponse(BaseModel):
    ids: list[int]
    items: int = Field(description="items in the collection after the add")


# Request models the routes parse themselves (JSON or multipart): see request_schemas().
REQUEST_MODELS: tuple[type[BaseModel], ...] = (SearchRequest, AddRequest)


def request_schemas() -> dict[str, dict[str, Any]]:
    """JSON schemas of :data:`REQUEST_MODELS` (and the models they refer to) by name, with
    ``$ref`` pointing into the OpenAPI components."""
    _, top = models_json_schema(
        [(model, "validation") for model in REQUEST_MODELS],
        ref_template=COMPONENTS + "{model}",
    )
    return dict(top.get("$defs", {}))


SEARCH_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": COMPONENTS + "SearchRequest"}},
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

ADD_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": COMPONENTS + "AddRequest"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "labels": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["files"],
            }
        },
    },
}
