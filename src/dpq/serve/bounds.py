"""How much one request may ask of the service: the bounds, in one place.

The request schemas (:mod:`dpq.serve.schemas`) declare them, so they are in the OpenAPI
description and a request beyond them gets 422 before any work; :class:`Collection.search
<dpq.serve.collection.Collection.search>` checks the same bounds with
:func:`check_search_bounds` for callers that skip HTTP. The index takes far more
(``k`` up to :data:`dpq.index.MAX_K`); these bounds keep one answer small.
"""

from __future__ import annotations

from typing import Any

from dpq.index import MAX_K

__all__ = [
    "MAX_IMAGES_PER_REQUEST",
    "MAX_NPROBE",
    "MAX_OFFSET",
    "MAX_RERANK_CANDIDATES",
    "MAX_RESULTS",
    "MAX_VECTORS_PER_REQUEST",
    "check_search_bounds",
]

MAX_RESULTS = 1000  # k: results in one answer
MAX_OFFSET = 10_000  # ranks skipped (paging)
MAX_RERANK_CANDIDATES = 100_000  # shortlist size of a re-ranked search
MAX_NPROBE = MAX_K  # cells to visit: the index's own bound (it visits at most every cell)
MAX_VECTORS_PER_REQUEST = 10_000  # vectors (and their labels and names) in one add
MAX_IMAGES_PER_REQUEST = 1000  # images in one add (base64 or uploaded files)


def _check(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer in {low}..{high}; got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}; got {value}.")


def check_search_bounds(
    k: Any, offset: Any, rerank_candidates: Any = None, nprobe: Any = None
) -> None:
    """ValueError naming the first of k (1..MAX_RESULTS), offset (0..MAX_OFFSET),
    rerank_candidates (1..MAX_RERANK_CANDIDATES) or nprobe (1..MAX_NPROBE) out of bounds;
    None for the last two means "not given"."""
    _check("k", k, 1, MAX_RESULTS)
    _check("offset", offset, 0, MAX_OFFSET)
    if rerank_candidates is not None:
        _check("rerank_candidates", rerank_candidates, 1, MAX_RERANK_CANDIDATES)
    if nprobe is not None:
        _check("nprobe", nprobe, 1, MAX_NPROBE)
