"""How a search request becomes its answer: the query's vector (given, an item's, or an
image's through the model), the pages of queries searched together, and the JSON of each.

Single searches that arrive together are answered by :func:`answer_queries`, one call per
group of the micro-batcher (:mod:`dpq.serve.batching`): a group holds queries of one
:func:`batch_key`, i.e. equal search settings, so each query's page is exactly the one it
gets when searched alone (tie order and tie groups included). ``POST /search/batch`` is
:func:`answer_batch`. Everything here runs on the search pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dpq.serve.collection import SearchHits
from dpq.serve.context import ServiceContext
from dpq.serve.encoder import predictions_of
from dpq.serve.images import decode_base64, decode_upload, model_input
from dpq.serve.labels import label_filter
from dpq.serve.schemas import BatchSearchRequest, SearchOptions, SearchRequest

__all__ = [
    "SearchQuery",
    "Upload",
    "answer_batch",
    "answer_queries",
    "answer_search",
    "batch_key",
    "check_one_query",
    "image_input",
    "image_query",
]

Upload = tuple[bytes, str]  # (file bytes, a name for messages)
_QUERY_FIELDS = {"image", "vector", "id"}


@dataclass(frozen=True)
class SearchQuery:
    """One single search waiting for its answer: the request's ``params``, when it
    ``started`` (perf_counter seconds, for ``took_ms``), and for an image query the model's
    float32 (D,) ``vector`` and its ``query`` field (None: the vector or id of ``params``)."""

    params: SearchRequest
    started: float
    vector: np.ndarray | None = None
    query: dict[str, Any] = field(default_factory=dict)


def own_exclusion(params: SearchRequest) -> int | None:
    """The id an id query leaves out of its results besides ``exclude`` (itself, when
    ``exclude_query``), None when it adds none."""
    if params.id is None or not params.exclude_query or params.id in (params.exclude or ()):
        return None
    return params.id


def batch_key(params: SearchRequest) -> str:
    """Queries of equal keys may share one search: every option but the query itself, and
    whether the query adds its own id to the exclusions (which changes how deep the first
    search reads)."""
    options = params.model_dump_json(exclude=_QUERY_FIELDS | {"exclude_query"})
    return f"{options}|own={own_exclusion(params) is not None}"


def check_one_query(params: SearchRequest, upload: Upload | None) -> None:
    """ValueError unless exactly one of an upload, a base64 image, a vector or an id is given."""
    given = [params.image is not None or upload is not None, params.vector is not None]
    if sum(given) + (params.id is not None) != 1:
        raise ValueError(
            "give exactly one query: an uploaded image, 'image' (base64), 'vector' or 'id'."
        )


def image_input(service: ServiceContext, upload: Upload) -> tuple[np.ndarray, Any]:
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


async def image_query(
    service: ServiceContext, params: SearchRequest, upload: Upload | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """float32 (D,) features of the uploaded or base64 image of a request, and what the
    model predicts for it (the answer's ``query`` field). The image is decoded on the search
    pool; the model's pass is awaited here, on the event loop, so that no pool thread waits
    for it and the pass batches the images of every waiting request
    (:class:`~dpq.serve.encoder.BatchingEncoder`)."""

    def decoded() -> np.ndarray:
        if upload is not None:
            return image_input(service, upload)[0]
        data = (decode_base64(params.image or "", "image"), "image")
        return image_input(service, data)[0]

    pixels = await service.workers.search(decoded)
    collection = service.collection
    encoder = collection.model()
    with service.workers.admitted(), service.metrics.stage("encode"):
        features, logits = await asyncio.wrap_future(encoder.submit(pixels[None]))
    multi_label = collection.index.label_shape not in (None, ())
    return features[0], predictions_of(logits, 1, multi_label, collection.classes)[0]


async def answer_search(
    service: ServiceContext, params: SearchRequest, upload: Upload | None, started: float
) -> dict[str, Any]:
    """The answer (a JSON-able dict) to one single search (``POST /search``, whichever way
    its request came in): exactly one query, its image encoded when it has one, then
    searched with the queries of equal settings that wait with it (the micro-batcher).
    ``started``: when the request arrived (perf_counter seconds, for ``took_ms``)."""
    check_one_query(params, upload)
    query = SearchQuery(params, started)
    if upload is not None or params.image is not None:  # the model batches the images
        vector, shown = await image_query(service, params, upload)
        query = SearchQuery(params, started, vector, shown)
    with service.workers.admitted():  # searched with the queries that wait with it
        return await service.searches.submit(batch_key(params), query)


def query_vector(service: ServiceContext, values: list[float]) -> np.ndarray:
    """float32 (D,) of a request's vector; ValueError when its length is not the index's D."""
    vector = np.asarray(values, np.float32)
    if vector.shape != (service.collection.index.dim,):
        raise ValueError(
            f"the vector has {vector.size} values but this index expects "
            f"{service.collection.index.dim} (its feature dimension D)."
        )
    return vector


def _resolved(service: ServiceContext, query: SearchQuery) -> tuple[np.ndarray, dict[str, Any]]:
    """float32 (D,) vector and the answer's ``query`` field of a waiting search."""
    if query.vector is not None:
        return query.vector, query.query
    params = query.params
    if params.id is not None:
        collection = service.collection
        vector = collection.vectors_of([params.id])[0]
        return vector, {"id": params.id, "label": collection.label_of(params.id)}
    return query_vector(service, params.vector or []), {}


def search_pages(
    service: ServiceContext,
    vectors: np.ndarray,
    own: list[int | None],
    params: SearchOptions,
) -> list[SearchHits]:
    """Pages of float32 (nq, D) queries with the options of a request; ``own``: per query an
    id it leaves out besides ``params.exclude`` (:func:`own_exclusion`), or None."""
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
    if params.exclude or any(mine is not None for mine in own):
        base = list(params.exclude or [])
        exclude = [base if mine is None else [*base, mine] for mine in own]
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


def page_body(service: ServiceContext, hits: SearchHits, query: dict[str, Any]) -> dict[str, Any]:
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


def answer_facts(hits: SearchHits, params: SearchOptions, started: float) -> dict[str, Any]:
    """The AnswerFacts of a search answer (``took_ms`` since ``started``, perf_counter s)."""
    return {
        "bits": hits.bits,
        "took_ms": round((time.perf_counter() - started) * 1000, 3),
        "k": params.k,
        "offset": params.offset,
        "total": hits.total,
        "matching": hits.matching,
    }


def _pages_each(
    service: ServiceContext, vectors: np.ndarray, own: list[int | None], params: SearchOptions
) -> list[SearchHits | Exception]:
    """:func:`search_pages` of the queries together; when that fails, of each alone, so
    that a query that cannot be searched (e.g. distances overflowing float32) fails alone."""
    try:
        return list(search_pages(service, vectors, own, params))
    except Exception:
        if len(vectors) == 1:
            raise
    pages: list[SearchHits | Exception] = []
    for row, mine in enumerate(own):
        try:
            pages.append(search_pages(service, vectors[row : row + 1], [mine], params)[0])
        except Exception as exc:
            pages.append(exc)
    return pages


def answer_queries(service: ServiceContext, queries: list[SearchQuery]) -> list[Any]:
    """Per query of one :func:`batch_key` its SearchResponse JSON, or the exception it
    raises (an unknown id, a vector of the wrong length, ...): one index search for all,
    each page what the query alone gets; one query's failure leaves the others' answers."""
    answers: list[Any] = [None] * len(queries)
    ready: list[tuple[int, np.ndarray, dict[str, Any]]] = []
    for number, query in enumerate(queries):
        try:
            ready.append((number, *_resolved(service, query)))
        except Exception as exc:
            answers[number] = exc
    if ready:
        service.metrics.batch_queries.observe(len(ready))
        params = queries[ready[0][0]].params  # every option but the query is equal
        vectors = np.stack([vector for _, vector, _ in ready])
        own = [own_exclusion(queries[number].params) for number, _, _ in ready]
        pages = _pages_each(service, vectors, own, params)
        for (number, _, shown), hits in zip(ready, pages, strict=True):
            try:
                if isinstance(hits, Exception):
                    raise hits
                body = page_body(service, hits, shown)
                answers[number] = {**body, **answer_facts(hits, params, queries[number].started)}
            except Exception as exc:
                answers[number] = exc
    return answers


def answer_batch(
    service: ServiceContext, params: BatchSearchRequest, started: float
) -> dict[str, Any]:
    """The BatchSearchResponse JSON of ``POST /search/batch``: one index search for every
    query of the request; any bad query fails the request."""
    collection = service.collection
    for number, one in enumerate(params.queries):
        if (one.vector is None) == (one.id is None):
            raise ValueError(f"queries[{number}] must give exactly one of 'vector' or 'id'.")
    ids = [one.id for one in params.queries if one.id is not None]
    by_id = dict(zip(ids, collection.vectors_of(ids), strict=True)) if ids else {}
    vectors = np.stack(
        [
            by_id[one.id] if one.id is not None else query_vector(service, one.vector or [])
            for one in params.queries
        ]
    )
    query_ids = [one.id for one in params.queries]
    own = [query_id if params.exclude_query else None for query_id in query_ids]
    pages = search_pages(service, vectors, own, params)
    responses = [
        page_body(
            service,
            hits,
            {} if query_id is None else {"id": query_id, "label": collection.label_of(query_id)},
        )
        for hits, query_id in zip(pages, query_ids, strict=True)
    ]
    return {"responses": responses, **answer_facts(pages[0], params, started)}
