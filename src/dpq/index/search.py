"""Searching a :class:`~dpq.index.store.CodeStore`: the settings of one search, and the
strategies that scan it.

The shape is faiss's: per-call settings in one object (:class:`SearchParameters`, like
``faiss.SearchParameters``), strategies apart from the storage they read
(:class:`FullScan` like a flat index, :class:`ProbedCells` like ``IndexIVF`` with
``nprobe`` over ``InvertedLists``), and re-ranking as composition (:class:`Rerank` over a
base strategy, like ``IndexRefine(base, refine)``).

Scores. Per query a lookup table (:func:`lookup_tables`) holds the additive term of every
codeword; an item's score is the sum of its codes' entries, plus its stored prefix norm for
"aqd" beyond one level. "aqd" is AQD (paper Eq. 30) without ||q||^2, which :func:`search`
adds at the end; "ip" is minus the inner product with the reconstruction. Every strategy
returns per query the k best (score, row) pairs ascending, rows in storage order, padded
with (inf, -1); equal scores are ordered by row.

Threads: the kernels release the GIL; :func:`split_top_k` decides how one scan is spread
over threads (split the queries, else split the rows or cells and merge the per-piece
lists), for every strategy. numpy and numba only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from dpq.index import kernels, lanes
from dpq.index.checks import check_k, check_num_levels
from dpq.index.store import CodeStore

__all__ = [
    "SEARCH_MODES",
    "FullScan",
    "ProbedCells",
    "Rerank",
    "SearchParameters",
    "Strategy",
    "check_queries",
    "lookup_tables",
    "search",
    "split_top_k",
    "strategy_for",
]

SEARCH_MODES = ("aqd", "ip")
# Upper bound on lookup-table memory per search batch.
_MAX_LUT_BYTES = 64 * 2**20
_NO_NORMS = np.empty(0, np.float32)


@dataclass(frozen=True)
class SearchParameters:
    """The settings of one search (k aside), checked when made.

    num_levels: code prefix to rank with (None: every level). mode: "aqd" (squared
    Euclidean distance, Eq. 30) or "ip" (negative inner product); None: the index's own.
    nprobe: scan only the nprobe non-empty cells nearest each query, plus the tail (a
    partitioned index only; None: every item). rerank_from: shortlist with this shorter
    prefix, then re-rank the shortlist with num_levels; rerank_candidates: the shortlist's
    length (default max(10 k, 100); needs rerank_from). threads: most threads one search
    uses (None: numba.get_num_threads()); small searches run on the calling thread.

    num_levels and rerank_from are checked against an index by :meth:`for_store`.
    """

    num_levels: int | None = None
    mode: Literal["aqd", "ip"] | None = None
    nprobe: int | None = None
    rerank_from: int | None = None
    rerank_candidates: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {SEARCH_MODES}; got {self.mode!r}.")
        if self.rerank_candidates is not None:
            if self.rerank_from is None:
                raise ValueError("rerank_candidates needs rerank_from (the shortlist's prefix).")
            candidates = check_k(self.rerank_candidates, "rerank_candidates")
            object.__setattr__(self, "rerank_candidates", candidates)
        if self.nprobe is not None:
            object.__setattr__(self, "nprobe", check_k(self.nprobe, "nprobe"))
        if self.threads is not None:
            if isinstance(self.threads, bool) or not isinstance(self.threads, int | np.integer):
                raise ValueError(f"threads must be a positive integer; got {self.threads!r}.")
            if self.threads < 1:
                raise ValueError(f"threads must be at least 1; got {self.threads}.")
            object.__setattr__(self, "threads", int(self.threads))

    def for_store(self, store: CodeStore, search_mode: str) -> SearchParameters:
        """These settings for one store, num_levels and mode filled in (``search_mode``
        when mode is None); ValueError where they do not fit it."""
        levels = check_num_levels(self.num_levels, store.num_levels, store.codebook_size)
        rerank_from = self.rerank_from
        if rerank_from is not None:
            rerank_from = check_num_levels(
                rerank_from, store.num_levels, store.codebook_size, "rerank_from"
            )
            if rerank_from >= levels:
                raise ValueError(
                    f"rerank_from must be smaller than num_levels={levels} (it is the shorter "
                    f"prefix used for the shortlist); got {rerank_from}."
                )
        if self.nprobe is not None and store.partition_levels == 0:
            raise ValueError(
                "nprobe needs a partitioned index, but this one has partition_levels=0; build "
                "it with DPQIndex(..., partition_levels=1 or 2) or call index.repartition(1), "
                "or leave nprobe out to scan every item."
            )
        mode = search_mode if self.mode is None else self.mode
        return SearchParameters(
            levels, mode, self.nprobe, rerank_from, self.rerank_candidates, self.threads
        )


def check_queries(queries: Any, dim: int) -> np.ndarray:
    """float32 C-contiguous (nq, dim) finite queries, else a ValueError naming the problem."""
    arr = np.asarray(queries)
    if arr.ndim != 2:
        hint = " (use queries[None, :] for one query)" if arr.ndim == 1 else ""
        raise ValueError(f"queries must be a 2-D array (nq, {dim}); got shape {arr.shape}{hint}.")
    if arr.shape[1] != dim:
        raise ValueError(
            f"queries have dimension {arr.shape[1]} but the index expects dim {dim} "
            "(the codebooks' D); encode queries with the model that built this index."
        )
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"queries must be real numbers; got dtype {arr.dtype}.")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        raise ValueError(
            f"queries contain NaN or inf in {int((~finite).sum())} row(s) (first: row "
            f"{int(np.flatnonzero(~finite)[0])}); check the feature extractor."
        )
    return arr


def lookup_tables(
    store: CodeStore, queries: np.ndarray, num_levels: int, mode: str, threads: int | None = None
) -> np.ndarray:
    """float32 (nq, num_levels * K): per-level additive terms of the ranking score of
    float32 queries (nq, D). "aqd": -2 <q, C_l[k]> (plus ||C_1[k]||^2 when num_levels == 1,
    which is then the whole reconstruction norm); "ip": -<q, C_l[k]>."""
    books = store.codebooks[:num_levels].reshape(-1, store.dim)
    luts = np.empty((len(queries), len(books)), np.float32)
    scale = np.float32(-1.0 if mode == "ip" else -2.0)

    def job(q0: int, q1: int) -> None:
        kernels.scaled_dots(queries[q0:q1], books, scale, luts[q0:q1])

    work = luts.size * store.dim // 4
    kernels.run_split(job, len(queries), kernels.worker_count(work, threads))
    if mode == "aqd" and num_levels == 1:
        luts += store.codeword_sq_norms[0]
    return luts


def split_top_k(
    scan: Callable[[int, int, int, int, np.ndarray, np.ndarray], None],
    nq: int,
    k: int,
    parts: int,
    threads: int,
    reach: Callable[[int, int], int] | None = None,
    queries_per_pass: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """The one way a scan is spread over threads: top-k scores float32 (nq, k) and rows
    int64 (nq, k) of nq queries over ``parts`` parts of work (rows of a range, or positions
    in each query's cell list).

    ``scan(q0, q1, first, stop, out_d, out_r)`` writes the best ``out_d.shape[1]`` pairs of
    queries q0..q1-1 over parts first..stop-1 into out_d / out_r (q1 - q0, width), ascending.
    With at least ``queries_per_pass`` queries per thread (the queries one pass of the scan
    serves at once) the queries are split, in blocks of ``queries_per_pass`` (each job scans
    every part); with fewer the parts are cut into 4 pieces per thread, each scanned for
    every query, and the per-piece lists merged. ``reach(first, stop)``: most pairs a piece
    can hold (its lists are then min(k, widest reach) wide); None: k.
    """
    if nq >= threads * queries_per_pass:
        out_d = np.empty((nq, k), np.float32)
        out_r = np.empty((nq, k), np.int64)

        def by_queries(b0: int, b1: int) -> None:
            q0, q1 = b0 * queries_per_pass, min(b1 * queries_per_pass, nq)
            scan(q0, q1, 0, parts, out_d[q0:q1], out_r[q0:q1])

        kernels.run_split(by_queries, -(-nq // queries_per_pass), threads)
        return out_d, out_r
    pieces = kernels.split_range(parts, 4 * threads)
    width = k if reach is None else min(k, max((reach(a, b) for a, b in pieces), default=0))
    shard_d = np.empty((len(pieces), nq, width), np.float32)
    shard_r = np.empty((len(pieces), nq, width), np.int64)

    def by_pieces(s0: int, s1: int) -> None:
        for shard in range(s0, s1):
            first, stop = pieces[shard]
            scan(0, nq, first, stop, shard_d[shard], shard_r[shard])

    kernels.run_split(by_pieces, len(pieces), threads)
    return kernels.merge_shards(shard_d, shard_r, k)


def _item_norms(store: CodeStore, num_levels: int, mode: str) -> np.ndarray:
    """What a scan adds per item: the prefix norms for "aqd" beyond one level; none for a
    one-level "aqd" table (it folds them in) or for "ip"."""
    return store.norms(num_levels) if mode == "aqd" and num_levels > 1 else _NO_NORMS


class Strategy(Protocol):
    """A way to find the top k of a store: ``top_k(queries, luts, k)`` with float32
    queries (nq, D) and their tables float32 (nq, num_levels * K) of :func:`lookup_tables`
    returns scores float32 (nq, k) and rows int64 (nq, k) (see the module doc)."""

    store: CodeStore
    num_levels: int
    mode: str

    def top_k(
        self, queries: np.ndarray, luts: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]: ...


class FullScan:
    """Every row of the store, scored with its first ``num_levels`` codes."""

    def __init__(
        self, store: CodeStore, num_levels: int, mode: str, threads: int | None = None
    ) -> None:
        self.store, self.num_levels, self.mode, self.threads = store, num_levels, mode, threads

    def top_k(self, queries: np.ndarray, luts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.top_k_of_rows(luts, k, 0, self.store.ntotal)

    def top_k_of_rows(
        self, luts: np.ndarray, k: int, first: int, stop: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The top k among rows first..stop-1 only."""
        store, levels = self.store, self.num_levels
        norms = _item_norms(store, levels, self.mode)
        codes, stride = store.scan_layout()
        size = store.codebook_size

        def run(q0: int, q1: int, r0: int, r1: int, out_d: np.ndarray, out_r: np.ndarray):
            lanes.scan_rows(
                levels, stride, store.packed, codes, first + r0, first + r1, size, norms,
                luts[q0:q1], out_d.shape[1], out_d, out_r,
            )  # fmt: skip

        threads = kernels.worker_count(len(luts) * (stop - first) * levels, self.threads)
        return split_top_k(
            run, len(luts), k, stop - first, threads, reach=lambda a, b: b - a,
            queries_per_pass=lanes.LANE_WIDTHS[-1],
        )  # fmt: skip


class ProbedCells:
    """The rows of the ``nprobe`` non-empty cells nearest each query (cells of the first
    min(num_levels, p) codes, ranked by the table distance to their prefix reconstruction),
    plus every row of the tail. nprobe >= the number of cells gives the full scan's result."""

    def __init__(
        self, store: CodeStore, num_levels: int, mode: str, nprobe: int, threads: int | None = None
    ) -> None:
        self.store, self.num_levels, self.mode, self.threads = store, num_levels, mode, threads
        self.nprobe = nprobe

    def top_k(self, queries: np.ndarray, luts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        cell_d, cell_r = self._top_k_of_cells(luts, k)
        first, stop = self.store.grouped, self.store.ntotal
        if first == stop:
            return cell_d, cell_r
        tail = FullScan(self.store, self.num_levels, self.mode, self.threads)
        tail_d, tail_r = tail.top_k_of_rows(luts, k, first, stop)
        return kernels.merge_shards(np.stack([cell_d, tail_d]), np.stack([cell_r, tail_r]), k)

    def nearest_cells(self, luts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per query the nearest non-empty cells, best first: indices int64 (nq, P) into the
        row starts / stops int64 (C,) of the cell table (P = min(nprobe, C))."""
        store = self.store
        cell_levels = min(self.num_levels, store.partition_levels)
        starts, stops, cell_codes, cell_norms = store.cell_table(cell_levels)
        nq, n_cells = len(luts), len(starts)
        cells = np.empty((nq, min(self.nprobe, n_cells)), np.int64)
        # "aqd": the distance to the cell's prefix reconstruction; a one-level table has
        # its norms folded in already
        rank_norms = cell_norms if self.mode == "aqd" and self.num_levels > 1 else _NO_NORMS

        def rank(q0: int, q1: int) -> None:
            kernels.rank_cells(
                luts[q0:q1], cell_codes, rank_norms, store.codebook_size, cells[q0:q1]
            )

        work = nq * n_cells * cell_levels
        kernels.run_split(rank, nq, kernels.worker_count(work, self.threads))
        return cells, starts, stops

    def _top_k_of_cells(self, luts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        store, levels = self.store, self.num_levels
        cells, starts, stops = self.nearest_cells(luts)
        norms = _item_norms(store, levels, self.mode)
        codes, stride = store.scan_layout()
        cell_levels = min(levels, store.partition_levels)
        scan = kernels.cell_scan_kernel(levels, cell_levels, stride, store.packed)
        size = store.codebook_size

        def run(q0: int, q1: int, c0: int, c1: int, out_d: np.ndarray, out_r: np.ndarray):
            chosen = np.ascontiguousarray(cells[q0:q1, c0:c1])
            width = out_d.shape[1]
            scan(codes, starts, stops, chosen, size, norms, luts[q0:q1], width, out_d, out_r)

        nq, probe = cells.shape
        reach = probe * store.ntotal // max(len(starts), 1)  # expected items scanned per query
        threads = kernels.worker_count(nq * reach * levels, self.threads)
        return split_top_k(run, nq, k, probe, threads)


class Rerank:
    """A shortlist from ``base`` (a strategy over a shorter prefix), re-scored with the
    first ``num_levels`` codes. candidates: the shortlist's length (default max(10 k, 100)).
    A shortlist of every item gives the full scan's result."""

    def __init__(
        self,
        base: Strategy,
        num_levels: int,
        candidates: int | None = None,
        threads: int | None = None,
    ) -> None:
        if base.num_levels >= num_levels:
            raise ValueError(
                f"a rerank needs a base of fewer levels than {num_levels}; got {base.num_levels}."
            )
        self.base, self.num_levels, self.candidates = base, num_levels, candidates
        self.store, self.mode, self.threads = base.store, base.mode, threads

    def top_k(self, queries: np.ndarray, luts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        store, levels, short_levels = self.store, self.num_levels, self.base.num_levels
        shortlist = min(max(k, self.candidates or max(10 * k, 100)), store.ntotal)
        if short_levels == 1 and self.mode == "aqd":  # its table folds in the level-1 norm
            short_luts = lookup_tables(store, queries, 1, self.mode, self.threads)
        else:
            short_luts = np.ascontiguousarray(luts[:, : short_levels * store.codebook_size])
        _, candidates = self.base.top_k(queries, short_luts, shortlist)
        norms = _item_norms(store, levels, self.mode)  # levels > 1: "aqd" has norms here
        codes = store.codes
        out_d = np.empty((len(queries), k), np.float32)
        out_r = np.empty((len(queries), k), np.int64)

        def rerank(q0: int, q1: int) -> None:
            kernels.rerank_topk(
                codes,
                levels,
                store.codebook_size,
                norms,
                luts[q0:q1],
                candidates[q0:q1],
                out_d[q0:q1],
                out_r[q0:q1],
            )

        work = candidates.size * levels * 64  # random access: ~ a cache miss per lookup
        kernels.run_split(rerank, len(queries), kernels.worker_count(work, self.threads))
        return out_d, out_r


def strategy_for(store: CodeStore, params: SearchParameters) -> Strategy:
    """The strategy resolved settings (:meth:`SearchParameters.for_store`) ask for: a full
    scan or probed cells at the shortlist's prefix, under a :class:`Rerank` when re-ranking."""
    levels, mode, threads = params.num_levels, params.mode, params.threads
    scan_levels = levels if params.rerank_from is None else params.rerank_from
    if params.nprobe is None:
        base: Strategy = FullScan(store, scan_levels, mode, threads)
    else:
        base = ProbedCells(store, scan_levels, mode, params.nprobe, threads)
    if params.rerank_from is None:
        return base
    return Rerank(base, levels, params.rerank_candidates, threads)


def search(
    store: CodeStore, queries: np.ndarray, k: int, params: SearchParameters
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest items of checked float32 queries (nq, D) (:func:`check_queries`) with
    resolved settings (:meth:`SearchParameters.for_store`) and a checked k.

    Returns distances float32 (nq, w) ascending (plus ||q||^2 for "aqd") and ids int64
    (nq, w), w = min(k, ntotal), (inf, -1) where fewer items are reachable. Groups the
    store's tail first when it has outgrown what a search scans beside the probed cells.
    """
    store.group_added(only_if_large=True)
    nq, width = len(queries), min(k, store.ntotal)
    out_d = np.full((nq, width), np.inf, np.float32)
    out_i = np.full((nq, width), -1, np.int64)
    if nq == 0 or width == 0:
        return out_d, out_i
    strategy = strategy_for(store, params)
    levels, mode = params.num_levels, params.mode
    batch = max(1, min(nq, _MAX_LUT_BYTES // (levels * store.codebook_size * 4)))
    for start in range(0, nq, batch):
        qb = queries[start : start + batch]
        luts = lookup_tables(store, qb, levels, mode, params.threads)
        dist, rows = strategy.top_k(qb, luts, width)
        found = rows >= 0
        if mode == "aqd":
            dist = dist + np.einsum("qd,qd->q", qb, qb)[:, None]
        dist[~found] = np.inf
        out_d[start : start + batch] = dist
        out_i[start : start + batch] = np.where(found, store.ids[np.maximum(rows, 0)], -1)
    return out_d, out_i
