"""Retrieval metrics from a ranking: mAP@R, precision@R curves and precision-recall curves.

Metrics take a ranking and labels, never features. A ranking is an integer array
``ranked_ids`` of shape (nq, R') whose row ``i`` lists database indices for query ``i``,
best first. Labels are either single-label class ids, int (N,), or multi-hot, uint8/bool
(N, C). A database item is *relevant* to a query when it has the same class
(single-label) or shares at least one label with it (multi-label).

Tie rule: rankings produced by dpq order equal distances by ascending database index
(a stable sort), see :func:`rank_by_distance`. The metrics themselves score the ranking
they are given, in the order given.

Only numpy is imported here (no torch), so evaluation runs anywhere the index does.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Convention = Literal["retrieved", "all_relevant"]
CONVENTIONS: tuple[str, ...] = ("retrieved", "all_relevant")

# Elements of an (n_queries x R) block handled at once: bounds the temporary memory of a
# 1,000 x 54,000 multi-label ranking to a few tens of MB.
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class PRCurve:
    """Mean precision and recall over queries at each cutoff (number of items returned).

    Attributes:
        cutoffs: int64 (m,), increasing numbers of returned items.
        precision: float64 (m,), mean over queries of hits@cutoff / cutoff.
        recall: float64 (m,), mean over queries of hits@cutoff / relevant items in the
            database (a query with no relevant item in the database counts as recall 0).
    """

    cutoffs: np.ndarray
    precision: np.ndarray
    recall: np.ndarray

    def to_dict(self) -> dict[str, list[float]]:
        """Plain lists, ready for JSON."""
        return {
            "cutoffs": [int(c) for c in self.cutoffs],
            "precision": [float(p) for p in self.precision],
            "recall": [float(r) for r in self.recall],
        }


def rank_by_distance(distances: np.ndarray, k: int | None = None) -> np.ndarray:
    """Rank the database for each query by increasing distance; ties go to the lower index.

    Args:
        distances: float (nq, N), distance of each query to each database item.
        k: keep the first ``k`` ids of each row (default: all N).

    Returns:
        int64 (nq, min(k, N)) database indices, nearest first. Equal distances are ordered
        by ascending database index (the same order as ``np.argsort(kind="stable")``).
    """
    distances = np.asarray(distances)
    if distances.ndim != 2:
        raise ValueError(
            f"distances must be a 2-D array (n_queries, n_database); got shape {distances.shape}."
        )
    if not np.issubdtype(distances.dtype, np.number) or np.issubdtype(
        distances.dtype, np.complexfloating
    ):
        raise ValueError(f"distances must be real numbers; got dtype {distances.dtype}.")
    if np.issubdtype(distances.dtype, np.floating) and np.isnan(distances).any():
        raise ValueError("distances contain NaN; rankings need comparable numbers.")
    n_database = distances.shape[1]
    if k is None or k >= n_database:
        return np.argsort(distances, axis=1, kind="stable").astype(np.int64, copy=False)
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}.")
    # Partial selection: everything at or below the k-th smallest distance is a candidate;
    # candidates come out of flatnonzero in index order, so a stable sort keeps the tie rule.
    kth = np.partition(distances, k - 1, axis=1)[:, k - 1]
    ranked = np.empty((distances.shape[0], k), dtype=np.int64)
    for row, (row_distances, threshold) in enumerate(zip(distances, kth, strict=True)):
        candidates = np.flatnonzero(row_distances <= threshold)
        order = np.argsort(row_distances[candidates], kind="stable")[:k]
        ranked[row] = candidates[order]
    return ranked


def average_precision_at_r(
    ranked_ids: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    r: int | None = None,
    convention: Convention = "retrieved",
) -> np.ndarray:
    """Average precision over the top ``r`` of each query's ranking.

    AP@R = (1 / Z) * sum_{k <= R} P(k) rel(k), with P(k) the precision of the first k items
    and rel(k) = 1 when the k-th item is relevant. ``convention`` chooses Z:

    - ``"retrieved"`` (DVSQ / DPQ / DeepHash, the default): Z = number of relevant items in
      the top R. A query with no relevant item in its top R scores 0 (it is not dropped).
    - ``"all_relevant"``: Z = min(number of relevant items in the whole database, R), so
      only a ranking that puts every relevant item it can first scores 1. With R = the
      database size this is the classical AP. (pytorch-metric-learning's MAP@R also sets R
      per query to that count; pass such an ``r`` yourself to get it.)

    Args:
        ranked_ids: int (nq, R') database indices per query, best first (see
            :func:`rank_by_distance` for the tie rule). Every id must be in [0, N).
        query_labels: int (nq,) class ids, or multi-hot uint8/bool (nq, C).
        db_labels: int (N,) class ids, or multi-hot uint8/bool (N, C), same kind as queries.
        r: number of top items scored; default: all R' columns. An ``r`` larger than the
            database is clamped to N with a ``UserWarning`` saying so.
        convention: ``"retrieved"`` or ``"all_relevant"`` (see above).

    Returns:
        float64 (nq,) AP@R of each query.

    Raises:
        ValueError: empty query set, ids out of range, label arrays whose lengths or kinds
            do not match the ranking, an ``r`` the ranking is too short for, or an unknown
            convention.
    """
    if convention not in CONVENTIONS:
        raise ValueError(
            f"convention must be one of {CONVENTIONS}; got {convention!r}. Use 'retrieved' "
            "for the DVSQ/DPQ mAP@R or 'all_relevant' to divide by all relevant items."
        )
    labels = _Labels.build(query_labels, db_labels)
    ranked_ids = _check_ranking(ranked_ids, labels.n_queries, labels.n_database)
    r = _resolve_r(r, ranked_ids.shape[1], labels.n_database)

    precision_sum = np.zeros(labels.n_queries, dtype=np.float64)
    found = np.zeros(labels.n_queries, dtype=np.int64)
    for start, stop, relevant in labels.relevance_blocks(ranked_ids[:, :r]):
        rows, cols = np.nonzero(relevant)
        counts = np.bincount(rows, minlength=stop - start)
        # The j-th hit of a row (1-based) sits at rank cols + 1: P(k) = j / k at that rank.
        first_hit = np.concatenate(([0], np.cumsum(counts)[:-1]))
        hit_number = np.arange(1, rows.size + 1) - first_hit[rows]
        precision_sum[start:stop] = np.bincount(
            rows, weights=hit_number / (cols + 1.0), minlength=stop - start
        )
        found[start:stop] = counts

    if convention == "retrieved":
        denominator = found
    else:
        denominator = np.minimum(labels.relevant_in_database(), r)
    ap = np.zeros(labels.n_queries, dtype=np.float64)
    scored = denominator > 0
    ap[scored] = precision_sum[scored] / denominator[scored]
    return ap


def map_at_r(
    ranked_ids: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    r: int | None = None,
    convention: Convention = "retrieved",
) -> float:
    """Mean over queries of :func:`average_precision_at_r` (mAP@R).

    The default is the DVSQ/DPQ convention: each query's AP over its top R is divided by
    the number of relevant items found in that top R; a query with none scores 0 and is
    kept in the mean. Ties in distance are ordered by database index when the ranking comes
    from :func:`rank_by_distance` or a dpq index. ``r=None`` scores every column given, so a
    full ranking (R' = N) gives mAP@N, e.g. CIFAR-10's mAP@54000. An ``r`` above the database
    size is clamped with a ``UserWarning``. Arguments as in :func:`average_precision_at_r`.

    Returns:
        mAP@R as a Python float in [0, 1].
    """
    return float(average_precision_at_r(ranked_ids, query_labels, db_labels, r, convention).mean())


def precision_at(
    ranked_ids: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    ranks: Sequence[int] | np.ndarray,
) -> np.ndarray:
    """Mean precision over queries after each number of returned items (precision@R curve).

    Args:
        ranked_ids, query_labels, db_labels: as in :func:`average_precision_at_r`.
        ranks: numbers of returned items, each in [1, R'] (R' = columns of the ranking).

    Returns:
        float64 (len(ranks),) mean over queries of hits@rank / rank.
    """
    labels = _Labels.build(query_labels, db_labels)
    ranked_ids = _check_ranking(ranked_ids, labels.n_queries, labels.n_database)
    ranks = _check_cutoffs(ranks, ranked_ids.shape[1], "ranks")
    hits = _hits_at(labels, ranked_ids[:, : int(ranks.max())], ranks)
    return (hits / ranks).mean(axis=0)


def pr_curve(
    ranked_ids: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    cutoffs: Sequence[int] | np.ndarray | None = None,
    num_points: int = 50,
) -> PRCurve:
    """Precision-recall curve: mean precision and recall over queries at each cutoff.

    Recall divides the hits by the relevant items in the whole database, so the curve
    reaches recall 1 only when the ranking covers the whole database (R' = N).

    Args:
        ranked_ids, query_labels, db_labels: as in :func:`average_precision_at_r`.
        cutoffs: numbers of returned items, each in [1, R']; default
            :func:`default_cutoffs` (R', num_points).
        num_points: number of default cutoffs.

    Returns:
        A :class:`PRCurve`.
    """
    labels = _Labels.build(query_labels, db_labels)
    ranked_ids = _check_ranking(ranked_ids, labels.n_queries, labels.n_database)
    n_columns = ranked_ids.shape[1]
    if cutoffs is None:
        cutoffs = default_cutoffs(n_columns, num_points)
    cutoffs = _check_cutoffs(cutoffs, n_columns, "cutoffs")
    hits = _hits_at(labels, ranked_ids[:, : int(cutoffs.max())], cutoffs)
    total = labels.relevant_in_database()
    recall = np.zeros_like(hits, dtype=np.float64)
    has_relevant = total > 0
    recall[has_relevant] = hits[has_relevant] / total[has_relevant, None]
    return PRCurve(
        cutoffs=cutoffs, precision=(hits / cutoffs).mean(axis=0), recall=recall.mean(axis=0)
    )


def relevant_share(query_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """The share of the database relevant to each query (same class, or at least one shared
    label): a random ranking's expected precision at every rank, and so its expected AP.

    Returns:
        float64 (n_query,) in [0, 1].
    """
    labels = _Labels.build(query_labels, db_labels)
    return labels.relevant_in_database() / labels.n_database


def default_cutoffs(n: int, num_points: int = 50) -> np.ndarray:
    """About ``num_points`` cutoffs in [1, n] for a PR curve, int64 increasing: half spaced
    geometrically (detail at the top of the ranking, where precision is high), half evenly
    (even steps in recall), always including 1 and n."""
    if n < 1 or num_points < 2:
        raise ValueError(f"need n >= 1 and num_points >= 2; got n={n}, num_points={num_points}.")
    half = num_points // 2
    points = np.concatenate([np.geomspace(1, n, half), np.linspace(1, n, num_points - half)])
    return np.unique(points.round().astype(np.int64))


# --------------------------------------------------------------------------- internals


@dataclass(frozen=True)
class _Labels:
    """Validated labels. Single-label: int64 (n,). Multi-label: uint64 words (n, W) packing
    the multi-hot columns, so relevance is one AND per word."""

    query: np.ndarray
    database: np.ndarray
    multi_label: bool

    @property
    def n_queries(self) -> int:
        return self.query.shape[0]

    @property
    def n_database(self) -> int:
        return self.database.shape[0]

    @classmethod
    def build(cls, query_labels: np.ndarray, db_labels: np.ndarray) -> _Labels:
        query_labels = np.asarray(query_labels)
        db_labels = np.asarray(db_labels)
        if query_labels.ndim != db_labels.ndim or query_labels.ndim not in (1, 2):
            raise ValueError(
                "query and database labels must both be class ids, int (n,), or both "
                f"multi-hot (n, C); got shapes {query_labels.shape} and {db_labels.shape}."
            )
        if query_labels.shape[0] == 0:
            raise ValueError("the query set is empty: give at least one query.")
        if db_labels.shape[0] == 0:
            raise ValueError("the database is empty: give at least one database label.")
        if query_labels.ndim == 1:
            for name, array in (("query", query_labels), ("database", db_labels)):
                if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
                    raise ValueError(
                        f"{name} labels must be integer class ids; got dtype {array.dtype}. "
                        "Convert them with .astype(np.int64) or np.unique(..., return_inverse=True)."
                    )
            return cls(query_labels.astype(np.int64), db_labels.astype(np.int64), False)
        if query_labels.shape[1] != db_labels.shape[1]:
            raise ValueError(
                "query and database multi-hot labels must have the same number of classes; "
                f"got {query_labels.shape[1]} and {db_labels.shape[1]}."
            )
        return cls(
            _pack_multi_hot(query_labels, "query"), _pack_multi_hot(db_labels, "database"), True
        )

    def relevance_blocks(self, ranked_ids: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (start, stop, relevant bool (stop - start, R)) over blocks of queries."""
        n_queries, n_columns = ranked_ids.shape
        step = max(1, _BLOCK_ELEMENTS // max(n_columns, 1))
        for start in range(0, n_queries, step):
            stop = min(start + step, n_queries)
            ids = ranked_ids[start:stop]
            if not self.multi_label:
                relevant = self.database[ids] == self.query[start:stop, None]
            else:
                relevant = np.zeros(ids.shape, dtype=bool)
                for word in range(self.database.shape[1]):
                    shared = self.database[ids, word] & self.query[start:stop, word, None]
                    relevant |= shared != 0
            yield start, stop, relevant

    def relevant_in_database(self) -> np.ndarray:
        """int64 (nq,) number of relevant database items per query."""
        if not self.multi_label:
            classes, counts = np.unique(self.database, return_counts=True)
            position = np.clip(np.searchsorted(classes, self.query), 0, classes.size - 1)
            return np.where(classes[position] == self.query, counts[position], 0).astype(np.int64)
        total = np.zeros(self.n_queries, dtype=np.int64)
        step = max(1, _BLOCK_ELEMENTS // self.n_database)
        for start in range(0, self.n_queries, step):
            stop = min(start + step, self.n_queries)
            relevant = np.zeros((stop - start, self.n_database), dtype=bool)
            for word in range(self.database.shape[1]):
                shared = self.query[start:stop, word, None] & self.database[None, :, word]
                relevant |= shared != 0
            total[start:stop] = relevant.sum(axis=1)
        return total


def _pack_multi_hot(labels: np.ndarray, name: str) -> np.ndarray:
    """Multi-hot (n, C) of 0/1 -> uint64 (n, ceil(C / 64)) bit words."""
    if labels.dtype != np.bool_:
        if not np.issubdtype(labels.dtype, np.integer) and not np.issubdtype(
            labels.dtype, np.floating
        ):
            raise ValueError(
                f"{name} multi-hot labels must be 0/1 numbers; got dtype {labels.dtype}."
            )
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(
                f"{name} multi-hot labels must contain only 0 and 1; found other values. "
                "Pass class ids as a 1-D array instead, or binarise the labels."
            )
    packed = np.packbits(labels.astype(bool), axis=1)
    n_words = -(-packed.shape[1] // 8)
    padded = np.zeros((packed.shape[0], n_words * 8), dtype=np.uint8)
    padded[:, : packed.shape[1]] = packed
    return padded.view(np.uint64)


def _check_ranking(ranked_ids: np.ndarray, n_queries: int, n_database: int) -> np.ndarray:
    ranked_ids = np.asarray(ranked_ids)
    if ranked_ids.ndim != 2:
        raise ValueError(
            f"ranked_ids must be a 2-D array (n_queries, R); got shape {ranked_ids.shape}."
        )
    if not np.issubdtype(ranked_ids.dtype, np.integer):
        raise ValueError(
            f"ranked_ids must hold integer database ids; got dtype {ranked_ids.dtype}."
        )
    if ranked_ids.shape[0] == 0:
        raise ValueError("the query set is empty: ranked_ids has no rows.")
    if ranked_ids.shape[0] != n_queries:
        raise ValueError(
            f"ranked_ids has {ranked_ids.shape[0]} rows but there are {n_queries} query labels; "
            "give one label per query, in the ranking's row order."
        )
    if ranked_ids.shape[1] == 0:
        raise ValueError("ranked_ids has no columns: each query needs at least one ranked id.")
    if ranked_ids.shape[1] > n_database:
        raise ValueError(
            f"ranked_ids has {ranked_ids.shape[1]} columns but the database has only "
            f"{n_database} labels; a ranking cannot list more items than the database holds "
            "(check that db_labels is the whole database)."
        )
    low, high = int(ranked_ids.min()), int(ranked_ids.max())
    if low < 0 or high >= n_database:
        raise ValueError(
            f"ranked_ids must be database indices in [0, {n_database}); found values in "
            f"[{low}, {high}]. A -1 means a search was asked for more neighbours than exist: "
            "search with k <= the database size, and pass the labels of that same database."
        )
    return ranked_ids


def _resolve_r(r: int | None, n_columns: int, n_database: int) -> int:
    if r is None:
        return n_columns
    r = int(r)
    if r < 1:
        raise ValueError(f"r must be at least 1 (or None for the whole ranking); got {r}.")
    if r > n_database:
        warnings.warn(
            f"R = {r} is larger than the database ({n_database} items); using R = {n_database}.",
            UserWarning,
            stacklevel=3,
        )
        r = n_database
    if r > n_columns:
        raise ValueError(
            f"R = {r} but the ranking lists only {n_columns} ids per query; search with "
            f"k >= {r}, or lower r."
        )
    return r


def _check_cutoffs(cutoffs: Sequence[int] | np.ndarray, n_columns: int, name: str) -> np.ndarray:
    cutoffs = np.asarray(cutoffs)
    if cutoffs.ndim != 1 or cutoffs.size == 0 or not np.issubdtype(cutoffs.dtype, np.integer):
        raise ValueError(f"{name} must be a non-empty 1-D sequence of integers; got {cutoffs!r}.")
    if cutoffs.min() < 1 or cutoffs.max() > n_columns:
        raise ValueError(
            f"{name} must lie in [1, {n_columns}] (the ranking's length); got values in "
            f"[{cutoffs.min()}, {cutoffs.max()}]. Rank more items or lower the cutoffs."
        )
    return cutoffs.astype(np.int64)


def _hits_at(labels: _Labels, ranked_ids: np.ndarray, cutoffs: np.ndarray) -> np.ndarray:
    """int64 (nq, len(cutoffs)): relevant items among the first ``cutoff`` of each ranking."""
    hits = np.empty((labels.n_queries, cutoffs.size), dtype=np.int64)
    for start, stop, relevant in labels.relevance_blocks(ranked_ids):
        hits[start:stop] = np.cumsum(relevant, axis=1, dtype=np.int64)[:, cutoffs - 1]
    return hits
