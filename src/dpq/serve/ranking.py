"""How the service turns index searches into pages of results: ties in an order of their
own, tie groups said out loud, and filters that still give k results.

Ties. Items with equal codes (up to the code length searched) are at exactly the same
distance; at 8 bits a query meets groups of dozens. ``DPQIndex.search`` orders them by
position in the index, which follows ids, and ids follow the source's class order, so a
tie group would read as a ranking of the first classes. Here ties are ordered by
:func:`tie_keys`, a hash of the query and the id: deterministic (the same query gives the
same page, and pages continue each other) and unrelated to ids or labels. Every page says
where its tie groups are (:class:`TieGroup`). This is the service's presentation only: the
ranking metrics (:mod:`dpq.evaluate.metrics`) keep their documented tie rule.

Filters and exclusions. The index scans without them, so :func:`rank_pages` over-fetches:
it searches for more results than asked (more again as long as too few pass the filter, or
the tie group at the page's end is not closed), growing the request fourfold per round up
to every reachable item, so k results come back whenever k exist, in a bounded number of
rounds. A later step can push the filter into the scan (a row mask); the answers stay.

numpy only, no HTTP: :func:`rank_pages` takes the search as a function,
:func:`search_pages` runs it on a ``DPQIndex``.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpq.serve.labels import LabelFilter

__all__ = ["RankedPage", "TieGroup", "rank_pages", "search_pages", "tie_keys", "tie_seed"]

# A tie group still open at the end of the fetched results is followed this far (results
# fetched per query) before it is reported as incomplete: twice the deepest page
# (bounds.MAX_OFFSET + MAX_RESULTS = 11,000) rounded up to a power of four.
TIE_WINDOW = 4**7 * 2
GROWTH = 4  # each further round asks for this many times more results

_MASK64 = np.uint64(2**64 - 1)


def tie_seed(vector: np.ndarray) -> int:
    """A 64-bit seed of a query: the first 8 bytes of sha256 over its float32 values."""
    data = np.ascontiguousarray(vector, dtype="<f4").tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


def tie_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """uint64 (n,) keys ordering tied results: splitmix64 of ``id XOR seed``, a bijection of
    the id that scatters consecutive ids (so the order follows neither ids nor labels)."""
    with np.errstate(over="ignore"):
        z = np.asarray(ids, np.int64).astype(np.uint64) ^ np.uint64(seed)
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class TieGroup:
    """Results at one distance: ranks ``start`` .. ``end - 1`` of the whole ranking (0-based;
    they may reach beyond the page). ``complete`` is False when the group may go on past
    ``end`` (it was followed :data:`TIE_WINDOW` results deep and had not ended)."""

    start: int
    end: int
    distance: float
    complete: bool


@dataclass(frozen=True)
class RankedPage:
    """Ranks ``offset`` .. ``offset + n - 1`` of one query: ``ids`` int64 (n,), ``distances``
    float32 (n,) ascending, and the ``tie_groups`` that meet the page."""

    ids: np.ndarray
    distances: np.ndarray
    offset: int
    tie_groups: list[TieGroup]


Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
Keep = Callable[[np.ndarray, int], np.ndarray]


def _tie_groups(distances: np.ndarray, offset: int, stop: int, last_closed: bool) -> list[TieGroup]:
    """Groups of equal ``distances`` (sorted float32 (m,)) that meet ranks offset..stop-1 and
    hold two results or more, or are the last group and not closed."""
    if not len(distances):
        return []
    edges = np.flatnonzero(distances[1:] != distances[:-1]) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(distances)]])
    groups = []
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        if end <= offset or start >= stop:
            continue
        complete = end < len(distances) or last_closed
        if end - start >= 2 or not complete:
            groups.append(TieGroup(start, end, float(distances[start]), complete))
    return groups


def _page(
    distances: np.ndarray,
    ids: np.ndarray,
    seed: int,
    offset: int,
    k: int,
    last_closed: bool,
) -> RankedPage:
    order = np.lexsort((tie_keys(ids, seed), distances))
    distances, ids = distances[order], ids[order]
    stop = offset + k
    groups = _tie_groups(distances, offset, stop, last_closed)
    return RankedPage(ids[offset:stop], distances[offset:stop], offset, groups)


def rank_pages(
    search: Search,
    num_queries: int,
    offset: int,
    k: int,
    seeds: Sequence[int],
    limit: int,
    keep: Keep | None = None,
    first_fetch: int | None = None,
    tie_window: int = TIE_WINDOW,
) -> list[RankedPage]:
    """Ranks offset..offset+k-1 of each query, ties in :func:`tie_keys` order (see the
    module docstring).

    Args:
        search: ``search(queries, fetch)``: for the int64 query numbers ``queries`` (m,),
            distances float32 (m, w) ascending and ids int64 (m, w) (-1: none) of the
            nearest ``fetch`` items (w <= fetch).
        num_queries: queries 0..num_queries-1 (one search call answers them all, unless
            some need more results).
        offset, k: the page.
        seeds: per query its :func:`tie_seed`.
        limit: the most results a search can give (items reachable: the index size, or the
            shortlist of a re-ranked search); fetching this many exhausts the search.
        keep: ``keep(ids, query)``: bool mask of the results the query may show (a filter,
            exclusions); None keeps every result.
        first_fetch: results expected to hold the page (default offset + k); the first
            round asks for one more (it tells whether the page's last tie group goes on),
            later rounds :data:`GROWTH` times more, up to ``limit``.
        tie_window: how deep a tie group at the end of the page is followed.
    """
    want = offset + k
    # one result more than the page: it tells whether the tie group at the page's end goes on
    fetch = max(1, min(limit, (first_fetch or want) + 1))
    pending = np.arange(num_queries, dtype=np.int64)
    pages: list[RankedPage | None] = [None] * num_queries
    while len(pending):
        distances, ids = search(pending, fetch)
        exhausted_all = fetch >= limit
        still = []
        for row, query in enumerate(pending.tolist()):
            found = ids[row] >= 0
            # fewer results than asked: the index holds fewer, or fewer are reachable (nprobe)
            exhausted = exhausted_all or int(found.sum()) < fetch
            mask = found if keep is None else found & keep(ids[row], query)
            kept_d, kept_i = distances[row][mask], ids[row][mask]
            reached = distances[row][found]
            if len(kept_d) >= want:
                boundary = kept_d[want - 1]
                closed = exhausted or bool(reached[-1] > boundary)
                done = closed or fetch >= tie_window
            else:
                done = exhausted
            if done:
                last_closed = exhausted or (len(kept_d) > 0 and bool(reached[-1] > kept_d[-1]))
                pages[query] = _page(kept_d, kept_i, seeds[query], offset, k, last_closed)
            else:
                still.append(query)
        pending = np.asarray(still, dtype=np.int64)
        fetch = min(limit, fetch * GROWTH)
    return [page for page in pages if page is not None]


def search_pages(
    index: Any,
    queries: np.ndarray,
    k: int,
    offset: int,
    levels: int,
    rerank_from: int | None = None,
    rerank_candidates: int | None = None,
    label_filter: LabelFilter | None = None,
    excluded: Sequence[np.ndarray] | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[list[RankedPage], int | None]:
    """The pages of float32 (nq, D) ``queries`` from a ``DPQIndex`` (:func:`rank_pages`
    over ``index.search``), and how many items pass ``label_filter`` (None without one).

    ``levels``, ``rerank_from``, ``rerank_candidates`` and ``options`` (e.g. nprobe) go to
    ``index.search``; the shortlist of a re-ranked search is fixed for the page
    (``rerank_candidates``, default max(10 (offset + k), 100), as the index's default for
    offset + k results), so that asking for more results never changes it. ``excluded``:
    per query int64 ids never to return. Raises ValueError for an option the index does not
    take, nprobe on an index without partitions, or distances that overflow float32.
    """
    options = dict(options or {})
    for name in options:
        if name not in inspect.signature(index.search).parameters:
            raise ValueError(f"this index does not take the search option {name!r}.")
    if "nprobe" in options and index.partition_levels == 0:
        raise ValueError(
            "nprobe needs a partitioned index, but this one scans every item (it was "
            "encoded without `dpq encode --partition-levels 1` or 2); leave the request's "
            "nprobe field out."
        )
    want = offset + k
    shortlist = None
    if rerank_from is not None:
        shortlist = max(rerank_candidates or max(10 * want, 100), want)
    total = index.ntotal
    matching = None if label_filter is None else int(label_filter.mask(index.labels).sum())

    def keep(ids: np.ndarray, query: int) -> np.ndarray:
        mask = np.ones(len(ids), bool)
        if label_filter is not None:
            mask &= label_filter.mask(index.labels_of(ids))
        if excluded is not None:
            mask &= ~np.isin(ids, excluded[query])
        return mask

    def search(rows: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(over="ignore", invalid="ignore"):  # said below, in one sentence
            distances, ids = index.search(
                queries[rows],
                fetch,
                num_levels=levels,
                rerank_from=rerank_from,
                rerank_candidates=shortlist,
                **options,
            )
        if not np.isfinite(distances[ids >= 0]).all():
            raise ValueError(
                "the query's distances to the items overflow 32-bit floats (its largest "
                f"value is {float(np.abs(queries[rows]).max()):.3g}); scale the vector down "
                "(features are of the order of 1)."
            )
        return distances, ids

    first = want + max((len(e) for e in excluded), default=0) if excluded is not None else want
    if matching is not None:  # about total / matching results are read per match
        first = math.ceil(first * 1.25 * total / max(matching, 1))
    pages = rank_pages(
        search,
        len(queries),
        offset,
        k,
        [tie_seed(query) for query in queries],
        limit=total if shortlist is None else min(shortlist, total),
        keep=keep if label_filter is not None or excluded is not None else None,
        first_fetch=first,
    )
    return pages, matching
