"""dpq.index.search alone: SearchParameters checks, lookup tables, the thread dispatcher, and
each strategy (full scan, probed cells, re-rank) over a CodeStore against numpy references."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import shrinking_codebooks
from dpq.index import kernels
from dpq.index.codebooks import check_codebooks
from dpq.index.search import (
    FullScan,
    ProbedCells,
    Rerank,
    SearchParameters,
    lookup_tables,
    search,
    split_top_k,
    strategy_for,
)
from dpq.index.store import CodeStore

L, K, D, N = 3, 8, 6, 400


@pytest.fixture
def books() -> np.ndarray:
    return check_codebooks(shrinking_codebooks(L, K, D))


@pytest.fixture
def codes() -> np.ndarray:
    return np.random.default_rng(1).integers(0, K, size=(N, L))


@pytest.fixture
def queries() -> np.ndarray:
    return np.random.default_rng(2).standard_normal((5, D)).astype(np.float32)


def make_store(books, codes, partition_levels=0, tail=0) -> CodeStore:
    store = CodeStore(books, partition_levels)
    store.append(codes[: len(codes) - tail])
    store.group()
    if tail:
        store.append(codes[len(codes) - tail :])
    return store


def reference_scores(books, codes, queries, levels, mode):
    """float64 (nq, N) ranking scores: AQD without ||q||^2, or the negative inner product."""
    vectors = sum(books[lv].astype(np.float64)[codes[:, lv]] for lv in range(levels))
    dots = queries.astype(np.float64) @ vectors.T
    return -2 * dots + (vectors**2).sum(1) if mode == "aqd" else -dots


def assert_top_k(scores, rows, ref_scores, k):
    """rows are a top k of ref_scores (ties in any order of equal scores)."""
    for q in range(len(rows)):
        best = np.sort(ref_scores[q])[:k]
        np.testing.assert_allclose(ref_scores[q][rows[q]], best, atol=1e-4)
        np.testing.assert_allclose(scores[q], best, atol=1e-4)


def test_parameters_are_checked_when_made_and_frozen():
    params = SearchParameters(num_levels=2, nprobe=np.int64(3))
    assert params.nprobe == 3 and type(params.nprobe) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.nprobe = 4
    for kwargs, message in (
        ({"mode": "cosine"}, "mode must be one of"),
        ({"rerank_candidates": 10}, "needs rerank_from"),
        ({"rerank_from": 1, "rerank_candidates": 0}, "rerank_candidates must be"),
        ({"nprobe": 0}, "nprobe must be"),
        ({"threads": 0}, "threads must be at least 1"),
        ({"threads": True}, "threads must be a positive integer"),
    ):
        with pytest.raises(ValueError, match=message):
            SearchParameters(**kwargs)


def test_for_store_fills_defaults_and_checks_against_the_store(books, codes):
    flat = make_store(books, codes[:10])
    resolved = SearchParameters().for_store(flat, "ip")
    assert (resolved.num_levels, resolved.mode) == (L, "ip")
    assert SearchParameters(mode="aqd").for_store(flat, "ip").mode == "aqd"
    for params, message in (
        (SearchParameters(num_levels=L + 1), rf"num_levels must be in 1\.\.{L}"),
        (SearchParameters(num_levels=2, rerank_from=2), "rerank_from must be smaller"),
        (SearchParameters(nprobe=2), "nprobe needs a partitioned index"),
    ):
        with pytest.raises(ValueError, match=message):
            params.for_store(flat, "aqd")


@pytest.mark.parametrize("mode", ["aqd", "ip"])
def test_lookup_tables_hold_the_per_codeword_score_terms(books, queries, mode):
    store = CodeStore(books)
    scale = -2.0 if mode == "aqd" else -1.0
    luts = lookup_tables(store, queries, 2, mode)
    expected = scale * queries.astype(np.float64) @ books[:2].reshape(-1, D).T.astype(np.float64)
    np.testing.assert_allclose(luts, expected, rtol=1e-5, atol=1e-5)
    one = lookup_tables(store, queries, 1, mode)  # "aqd": the level-1 norms folded in
    folded = (books[0].astype(np.float64) ** 2).sum(1) if mode == "aqd" else 0
    np.testing.assert_allclose(one, expected[:, :K] + folded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("nq", [1, 5])
def test_split_top_k_gives_one_answer_however_the_work_is_split(threads, nq):
    scores = np.random.default_rng(3).integers(0, 20, size=(nq, 90)).astype(np.float32)

    def scan(q0, q1, first, stop, out_d, out_r):
        for q in range(q0, q1):
            rows = np.arange(first, stop)
            order = np.lexsort((rows, scores[q, first:stop]))[: out_d.shape[1]]
            out_d[q - q0] = np.inf
            out_r[q - q0] = -1
            out_d[q - q0, : len(order)] = scores[q, rows[order]]
            out_r[q - q0, : len(order)] = rows[order]

    dist, rows = split_top_k(scan, nq, 12, 90, threads, reach=lambda a, b: b - a)
    for q in range(nq):
        order = np.lexsort((np.arange(90), scores[q]))[:12]
        np.testing.assert_array_equal(rows[q], order)
        np.testing.assert_array_equal(dist[q], scores[q, order])


@pytest.mark.parametrize("nq", [3, 9, 13])
def test_split_top_k_hands_out_queries_in_blocks_of_one_pass(nq):
    scores = np.random.default_rng(4).integers(0, 20, size=(nq, 40)).astype(np.float32)
    calls = []

    def scan(q0, q1, first, stop, out_d, out_r):
        calls.append((q0, q1, first, stop))
        for q in range(q0, q1):
            order = np.lexsort((np.arange(first, stop), scores[q, first:stop]))[: out_d.shape[1]]
            out_d[q - q0] = np.inf
            out_r[q - q0] = -1
            out_d[q - q0, : len(order)] = scores[q, first + order]
            out_r[q - q0, : len(order)] = first + order

    dist, rows = split_top_k(scan, nq, 7, 40, 2, reach=lambda a, b: b - a, queries_per_pass=4)
    for q in range(nq):
        order = np.lexsort((np.arange(40), scores[q]))[:7]
        np.testing.assert_array_equal(rows[q], order)
        np.testing.assert_array_equal(dist[q], scores[q, order])
    if nq >= 8:  # split by queries: every job starts a block of 4, only the last is short
        assert all(q0 % 4 == 0 and (q1 - q0 == 4 or q1 == nq) for q0, q1, _, _ in calls)
        assert sorted(q0 for q0, _, _, _ in calls) == list(range(0, nq, 4))
    else:  # fewer queries than two passes: every job scans all of them over a piece of rows
        assert all((q0, q1) == (0, nq) for q0, q1, _, _ in calls) and len(calls) > 1


@pytest.mark.parametrize("mode", ["aqd", "ip"])
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_full_scan_returns_the_top_k_of_every_row(books, codes, queries, mode, levels):
    store = make_store(books, codes, 1, tail=30)
    luts = lookup_tables(store, queries, levels, mode)
    scores, rows = FullScan(store, levels, mode).top_k(queries, luts, 15)
    stored = store.codes[:, :L].astype(np.int64)
    assert_top_k(scores, rows, reference_scores(books, stored, queries, levels, mode), 15)


@pytest.mark.parametrize("partition_levels", [1, 2])
def test_probed_cells_over_every_cell_equal_the_full_scan_bit_for_bit(
    books, codes, queries, partition_levels
):
    store = make_store(books, codes, partition_levels, tail=5)
    assert store.ungrouped == 5
    for levels in (1, 3):
        luts = lookup_tables(store, queries, levels, "aqd")
        full = FullScan(store, levels, "aqd").top_k(queries, luts, 20)
        probed = ProbedCells(store, levels, "aqd", K**2).top_k(queries, luts, 20)
        np.testing.assert_array_equal(probed[0], full[0])
        np.testing.assert_array_equal(probed[1], full[1])


def test_probed_cells_scan_only_the_nearest_cells_and_the_tail(books, codes, queries):
    store = make_store(books, codes, 1, tail=5)
    luts = lookup_tables(store, queries, L, "aqd")
    strategy = ProbedCells(store, L, "aqd", 2)
    cells, starts, stops = strategy.nearest_cells(luts)
    scores, rows = strategy.top_k(queries, luts, 10)
    stored = store.codes[:, :L].astype(np.int64)
    ref = reference_scores(books, stored, queries, L, "aqd")
    for q in range(len(queries)):
        reachable = np.concatenate(
            [np.arange(starts[c], stops[c]) for c in cells[q]] + [np.arange(N - 5, N)]
        )
        best = np.sort(ref[q, reachable])[:10]
        assert set(rows[q]) <= set(reachable)
        np.testing.assert_allclose(scores[q], best, atol=1e-4)


def test_rerank_rescores_the_base_shortlist_with_more_levels(books, codes, queries):
    store = make_store(books, codes)
    luts = lookup_tables(store, queries, L, "aqd")
    scores, rows = Rerank(FullScan(store, 1, "aqd"), L, candidates=40).top_k(queries, luts, 10)
    short_luts = lookup_tables(store, queries, 1, "aqd")
    _, shortlist = FullScan(store, 1, "aqd").top_k(queries, short_luts, 40)
    ref = reference_scores(books, codes, queries, L, "aqd")
    for q in range(len(queries)):
        assert set(rows[q]) <= set(shortlist[q])
        np.testing.assert_allclose(scores[q], np.sort(ref[q, shortlist[q]])[:10], atol=1e-4)
    with pytest.raises(ValueError, match="fewer levels"):
        Rerank(FullScan(store, L, "aqd"), L)


def test_strategy_for_composes_what_the_settings_ask_for(books, codes):
    store = make_store(books, codes, 1)

    def resolved(**kwargs):
        return SearchParameters(**kwargs).for_store(store, "aqd")

    assert isinstance(strategy_for(store, resolved()), FullScan)
    assert isinstance(strategy_for(store, resolved(nprobe=3)), ProbedCells)
    rerank = strategy_for(store, resolved(nprobe=3, rerank_from=1))
    assert isinstance(rerank, Rerank) and isinstance(rerank.base, ProbedCells)
    assert rerank.base.num_levels == 1 and rerank.num_levels == L


def test_search_gives_distances_and_ids_whatever_the_thread_limit(
    books, codes, queries, monkeypatch
):
    store = CodeStore(books, 1)
    store.append(codes, ids=np.arange(N) * 2)
    one = search(store, queries, 7, SearchParameters(threads=1).for_store(store, "aqd"))
    monkeypatch.setattr(kernels, "PARALLEL_MIN_WORK", 0)
    for q in (queries, queries[:1]):  # queries split, then rows split
        three = search(store, q, 7, SearchParameters(threads=3).for_store(store, "aqd"))
        np.testing.assert_array_equal(three[1], one[1][: len(q)])
        np.testing.assert_array_equal(three[0], one[0][: len(q)])
    vectors = sum(books[lv].astype(np.float64)[codes[:, lv]] for lv in range(L))
    ref = ((queries[:, None].astype(np.float64) - vectors[None]) ** 2).sum(-1)
    np.testing.assert_allclose(one[0], np.sort(ref, axis=1)[:, :7], atol=1e-4)
    assert np.all(one[1] % 2 == 0)  # ids, not rows
