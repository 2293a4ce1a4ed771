"""The JSON bodies of the HTTP API (pydantic models) and how they appear in its OpenAPI
description. The bounds they declare come from :mod:`dpq.serve.bounds`.

``/search`` and ``POST /items`` take JSON or a multipart upload, so their routes read the
body themselves and FastAPI does not see these request models; :func:`request_schemas`
gives their schemas for the description's components, so the routes' ``$ref`` resolve.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import models_json_schema

from dpq.serve.bounds import (
    MAX_EXCLUDED,
    MAX_FILTER_LABELS,
    MAX_ID,
    MAX_IMAGES_PER_REQUEST,
    MAX_NPROBE,
    MAX_OFFSET,
    MAX_QUERIES_PER_REQUEST,
    MAX_RERANK_CANDIDATES,
    MAX_RESULTS,
    MAX_VECTORS_PER_REQUEST,
)

__all__ = [
    "ADD_REQUEST_BODY",
    "AnswerFacts",
    "BATCH_REQUEST_BODY",
    "AddRequest",
    "AddResponse",
    "BatchQuery",
    "BatchSearchRequest",
    "BatchSearchResponse",
    "Filter",
    "Item",
    "ItemId",
    "ItemList",
    "QueryResults",
    "REQUEST_MODELS",
    "SEARCH_FORM_FIELDS",
    "SEARCH_REQUEST_BODY",
    "SearchOptions",
    "SearchRequest",
    "SearchResponse",
    "SearchResult",
    "TieGroup",
    "request_schemas",
]

COMPONENTS = "#/components/schemas/"

# An item id: int64 and never negative. Larger or negative ids get 422, never an overflow.
ItemId = Annotated[int, Field(ge=0, le=MAX_ID)]

# Requests are strict: `{"id": true}` and `"k": "5"` are refused, not read as 1 and 5.
STRICT = ConfigDict(extra="forbid", strict=True)


_NUMBER_TYPES = frozenset({int, float})


def _all_numbers(values: list) -> bool:
    """Whether every element is an int or a float (bool is not a number here). Parsed
    JSON holds exactly int and float, checked by the set of element types, built in C
    (~10x faster than a Python loop over 300 elements); subclasses (numpy's float64)
    take the loop."""
    if set(map(type, values)) <= _NUMBER_TYPES:
        return True
    return all(isinstance(x, int | float) and not isinstance(x, bool) for x in values)


def check_vector(value: Any) -> Any:
    """A flat list of numbers, else one ValueError sentence (not one error per element)."""
    if value is None or (isinstance(value, list) and _all_numbers(value)):
        return value
    if not isinstance(value, list):
        got = f"a {type(value).__name__}"
    elif any(isinstance(x, list) for x in value):
        got = "a list of lists"
    else:
        got = "a list holding something that is not a number"
    raise ValueError(f"a vector must be a flat list of numbers (D floats); got {got}.")


def check_vectors(value: Any) -> Any:
    """A list of flat lists of numbers, else one ValueError sentence."""
    if value is None:
        return value
    if not isinstance(value, list) or not all(
        isinstance(row, list) and _all_numbers(row) for row in value
    ):
        raise ValueError(
            "vectors must be a list of vectors, each a flat list of numbers (n x D floats)."
        )
    return value


class Filter(BaseModel):
    """Search only among items with these labels (class names or indices): ``match`` "any"
    (an item has one of them) or "all" (a multi-label item has every one). Applied before
    the page is cut: k results come back whenever k items pass."""

    model_config = STRICT

    labels: list[str | int] = Field(min_length=1, max_length=MAX_FILTER_LABELS)
    match: Literal["any", "all"] = "any"


class SearchOptions(BaseModel):
    """What every search takes besides its query (shared by single and batch searches)."""

    model_config = STRICT

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
    filter: Filter | None = Field(None, description="search only among items with these labels")
    exclude: list[ItemId] | None = Field(
        None, max_length=MAX_EXCLUDED, description="ids never to return"
    )
    exclude_query: bool = Field(
        True, description="for an id query: leave the query item itself out of its results"
    )
    with_codes: bool = Field(False, description="give each result's codes (L integers)")


class SearchRequest(SearchOptions):
    """A query: exactly one of ``image`` (base64 file bytes), ``vector`` (D floats) or ``id``
    (an item in the collection, searched with the reconstruction of its code)."""

    image: str | None = Field(None, description="base64 of an image file (needs a model)")
    vector: list[float] | None = Field(None, description="a query feature vector of length D")
    id: ItemId | None = Field(None, description="search with this item's reconstructed vector")

    _vector = field_validator("vector", mode="before")(check_vector)


class BatchQuery(BaseModel):
    """One query of a batch: exactly one of ``vector`` or ``id``."""

    model_config = STRICT

    vector: list[float] | None = Field(None, description="a query feature vector of length D")
    id: ItemId | None = Field(None, description="search with this item's reconstructed vector")

    _vector = field_validator("vector", mode="before")(check_vector)


class BatchSearchRequest(SearchOptions):
    """Several queries answered by one search of the index; the options apply to each."""

    queries: list[BatchQuery] = Field(min_length=1, max_length=MAX_QUERIES_PER_REQUEST)


# The fields of SearchRequest a multipart search may send as form fields: integers, and
# `filter` as JSON text.
SEARCH_FORM_FIELDS = ("k", "offset", "bits", "rerank", "rerank_candidates", "nprobe", "id")


class TieGroup(BaseModel):
    """Results at exactly one distance, so their order among themselves says nothing: ranks
    ``start`` .. ``end - 1`` of the whole ranking (0-based, ``end`` exclusive; the result
    ``results[j]`` has rank ``offset + j``, and a group may reach past the page on either
    side). Within a group the order is a hash of the query and the id: deterministic, but
    unrelated to ids or labels. ``complete`` is false when the group may continue past
    ``end`` (it was followed 32,768 results deep). Groups of one result are not listed."""

    start: int
    end: int
    distance: float
    complete: bool


class SearchResult(BaseModel):
    rank: int = Field(description="0-based rank in the whole ranking (offset + position)")
    id: int
    distance: float = Field(description="smaller is closer (ip indexes: -inner product)")
    label: Any = None
    image_url: str | None = None
    codes: list[int] | None = Field(None, description="the item's L codes (`with_codes`)")


class QueryResults(BaseModel):
    """The page of one query."""

    results: list[SearchResult]
    tie_groups: list[TieGroup] = Field(
        description="where results are tied (equal distance), ordered by `start`"
    )
    query: dict[str, Any] = Field(
        description="an id query: its `id` and `label`; an image query (with a model): "
        "`predicted_label`, the model classifier's most probable class (for a multi-label "
        "model the list of classes above probability 0.5), and `predicted_probability` (None "
        "for multi-label); a vector query: {}"
    )


class AnswerFacts(BaseModel):
    """What every search answer says besides its results."""

    bits: int = Field(description="the code length the ranking used")
    took_ms: float
    k: int
    offset: int
    total: int = Field(description="items in the collection")
    matching: int | None = Field(
        None, description="items that pass the filter (None without a filter)"
    )


class SearchResponse(QueryResults, AnswerFacts):
    """One query's page and the answer's facts."""


class BatchSearchResponse(AnswerFacts):
    responses: list[QueryResults] = Field(description="one per query, in the request's order")


class AddRequest(BaseModel):
    """Items to add: ``vectors`` (n, D) or ``images`` (base64 files, needs a model), with
    optional ``labels`` (class names or indices, None for unknown) and ``names``."""

    model_config = STRICT

    vectors: list[list[float]] | None = Field(None, max_length=MAX_VECTORS_PER_REQUEST)
    images: list[str] | None = Field(None, max_length=MAX_IMAGES_PER_REQUEST)
    labels: list[Any] | None = Field(None, max_length=MAX_VECTORS_PER_REQUEST)
    names: list[str | None] | None = Field(None, max_length=MAX_VECTORS_PER_REQUEST)

    _vectors = field_validator("vectors", mode="before")(check_vectors)


class AddResponse(BaseModel):
    ids: list[int]
    items: int = Field(description="items in the collection after the add")


class Item(BaseModel):
    """One item: its label, metadata (``file``: its image file relative to the collection,
    when the source has files; ``name``, ``added_at`` for items added over HTTP), and where
    its images are (``image_url``: a thumbnail; ``full_image_url``: the image at its own
    size)."""

    id: int
    label: Any = None
    metadata: dict[str, Any]
    image_url: str | None = None
    full_image_url: str | None = None


class ItemList(BaseModel):
    """Items ``offset`` .. ``offset + limit - 1`` in id order."""

    items: list[Item]
    offset: int
    limit: int
    total: int = Field(description="items in the collection")


# Request models the routes parse themselves (JSON or multipart): see request_schemas().
REQUEST_MODELS: tuple[type[BaseModel], ...] = (SearchRequest, BatchSearchRequest, AddRequest)


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
                    **{name: {"type": "integer"} for name in SEARCH_FORM_FIELDS},
                    "filter": {"type": "string", "description": "a Filter as JSON text"},
                    "with_codes": {"type": "boolean"},
                },
                "required": ["file"],
            }
        },
    },
}

BATCH_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {"application/json": {"schema": {"$ref": COMPONENTS + "BatchSearchRequest"}}},
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
