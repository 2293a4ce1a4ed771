"""DPQIndex: AQD lookup-table search against brute-force references, prefixes, rerank,
persistence, faiss interop, bad input, and the `dpq encode` / `dpq search` commands."""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pytest

from dpq.cli import main
from dpq.index import (
    DPQIndex,
    IndexFileError,
    SearchParameters,
    append_to_index_file,
    faiss_interop,
    files,
    greedy_residual_encode,
    kernels,
    load_faiss_index,
    merge_index_files,
    storage,
    write_faiss_ivf_ondisk,
)

L, K, D, N = 4, 16, 8, 300


# ------------------------------------------------------------------ fixtures and references


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def codebooks(rng) -> np.ndarray:
    scales = 0.5 ** np.arange(L)
    return (rng.standard_normal((L, K, D)) * scales[:, None, None]).astype(np.float32)


@pytest.fixture
def codes(rng) -> np.ndarray:
    return rng.integers(0, K, size=(N, L)).astype(np.uint8)


@pytest.fixture
def index(codebooks, codes) -> DPQIndex:
    built = DPQIndex(codebooks)
    built.add(codes)
    return built


@pytest.fixture
def queries(rng) -> np.ndarray:
    return rng.standard_normal((7, D)).astype(np.float32)


def reconstruct(codebooks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """float64 (N, D) sum of the selected codewords of each prefix level (the reference)."""
    levels = codes.shape[1]
    return sum(codebooks[level].astype(np.float64)[codes[:, level]] for level in range(levels))


def brute_force(queries, database, k, mode="aqd"):
    """Reference ranking: float64 scores, stable argsort (ties by position)."""
    q = queries.astype(np.float64)
    if mode == "aqd":
        scores = ((q[:, None, :] - database[None]) ** 2).sum(-1)
    else:
        scores = -(q @ database.T)
    order = np.argsort(scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def assert_same_ranking(dist, ids, ref_dist, ref_ids, tol=1e-4):
    """Distances equal to float tolerance; ids equal except where the reference has ties;
    padding (-1, inf) exactly where the reference has it."""
    pad = ref_ids < 0
    np.testing.assert_array_equal(ids < 0, pad)
    np.testing.assert_array_equal(np.isinf(dist), pad)
    if pad.all():
        return
    scale = max(1.0, float(np.abs(ref_dist[~pad]).max()))
    np.testing.assert_allclose(dist[~pad], ref_dist[~pad], rtol=0, atol=tol * scale)
    differ = ids != ref_ids
    for q in np.flatnonzero(differ.any(axis=1)):  # allowed only between (near-)equal distances
        found = ~pad[q]
        last, ref_last = dist[q][found][-1], ref_dist[q][found][-1]
        assert set(ids[q][found]) ^ set(ref_ids[q][found]) <= set(
            ref_ids[q][found][np.abs(ref_dist[q][found] - ref_last) <= tol * scale]
        ) | set(ids[q][found][np.abs(dist[q][found] - last) <= tol * scale])


def ids_of(rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """ids[rows], keeping -1 (padding) as -1."""
    return np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)


# ------------------------------------------------------------------ search against references


def test_lut_distances_equal_brute_force_distances_to_reconstructions(
    index, codebooks, codes, queries
):
    dist, ids = index.search(queries, k=20)
    ref_dist, ref_ids = brute_force(queries, reconstruct(codebooks, codes), 20)
    assert dist.dtype == np.float32 and ids.dtype == np.int64 and dist.shape == (7, 20)
    assert_same_ranking(dist, ids, ref_dist, ref_ids)
    np.testing.assert_array_equal(ids, ref_ids)  # random data: no ties
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_full_ranking_k_equals_ntotal_matches_brute_force(index, codebooks, codes, queries):
    dist, ids = index.search(queries, k=N)
    ref_dist, ref_ids = brute_force(queries, reconstruct(codebooks, codes), N)
    assert_same_ranking(dist, ids, ref_dist, ref_ids)
    assert all(sorted(row) == list(range(N)) for row in ids)


def test_item_reconstruction_used_as_query_ranks_that_item_first(index, codebooks, codes):
    unique_rows = np.unique(codes, axis=0, return_index=True)[1][:25]
    recon = reconstruct(codebooks, codes[unique_rows]).astype(np.float32)
    dist, ids = index.search(recon, k=3)
    np.testing.assert_array_equal(ids[:, 0], unique_rows)
    np.testing.assert_allclose(dist[:, 0], 0.0, atol=1e-4)
    assert np.all(dist[:, 1] > 1e-3)


@pytest.mark.parametrize("num_levels", [1, 2, 3])
def test_prefix_search_equals_index_built_from_truncated_codes_and_codebooks(
    index, codebooks, codes, queries, num_levels
):
    dist, ids = index.search(queries, k=15, num_levels=num_levels)
    truncated = DPQIndex(codebooks[:num_levels])
    truncated.add(codes[:, :num_levels])
    t_dist, t_ids = truncated.search(queries, k=15)
    np.testing.assert_array_equal(ids, t_ids)
    np.testing.assert_allclose(dist, t_dist, rtol=1e-5, atol=1e-5)
    ref_dist, ref_ids = brute_force(queries, reconstruct(codebooks, codes[:, :num_levels]), 15)
    assert_same_ranking(dist, ids, ref_dist, ref_ids)


@pytest.mark.parametrize("num_levels", [1, 4])
def test_inner_product_mode_matches_brute_force_inner_products(
    index, codebooks, codes, queries, num_levels
):
    dist, ids = index.search(queries, k=12, num_levels=num_levels, mode="ip")
    ref_dist, ref_ids = brute_force(
        queries, reconstruct(codebooks, codes[:, :num_levels]), 12, mode="ip"
    )
    assert_same_ranking(dist, ids, ref_dist, ref_ids)


def test_equal_distances_are_ordered_by_position_in_index(codebooks, rng):
    duplicated = np.repeat(rng.integers(0, K, size=(5, L)), 6, axis=0).astype(np.uint8)
    shuffled = rng.permutation(len(duplicated))
    built = DPQIndex(codebooks)
    built.add(duplicated[shuffled], ids=np.arange(100, 100 + len(duplicated)))
    q = rng.standard_normal((3, D)).astype(np.float32)
    dist, ids = built.search(q, k=len(duplicated))
    ref_dist, ref_rows = brute_force(q, reconstruct(codebooks, duplicated[shuffled]), 30)
    np.testing.assert_array_equal(ids, ref_rows + 100)  # stable: ties keep insertion order


def test_database_sharded_search_for_few_queries_equals_single_thread(index, queries, monkeypatch):
    serial = index.search(queries[:1], k=40)
    monkeypatch.setattr(kernels, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(kernels.numba, "get_num_threads", lambda: 3)
    sharded = index.search(queries[:1], k=40)
    split_queries = index.search(queries, k=40)
    np.testing.assert_array_equal(sharded[1], serial[1])
    np.testing.assert_array_equal(sharded[0], serial[0])
    np.testing.assert_array_equal(split_queries[1][:1], serial[1])


def test_results_have_min_k_ntotal_columns(codebooks, codes, queries):
    small = DPQIndex(codebooks)
    small.add(codes[:5])
    dist, ids = small.search(queries, k=8)
    assert ids.shape == dist.shape == (len(queries), 5)  # no column can hold an item
    assert all(sorted(row) == [0, 1, 2, 3, 4] for row in ids)
    assert np.isfinite(dist).all()
    empty_dist, empty_ids = DPQIndex(codebooks).search(queries, k=3)
    assert empty_ids.shape == empty_dist.shape == (len(queries), 0)


def test_huge_k_on_a_small_index_allocates_no_queries_times_k_arrays(codebooks, codes, queries):
    """issue 12, finding 6: k=10_000_000 on 100 items used to allocate (nq, k) results."""
    small = DPQIndex(codebooks)
    small.add(codes[:100])
    dist, ids = small.search(queries[:2], k=10_000_000)
    assert ids.shape == (2, 100) and dist.nbytes + ids.nbytes == 2 * 100 * 12
    ref = small.search(queries[:2], k=100)
    np.testing.assert_array_equal(ids, ref[1])
    np.testing.assert_array_equal(dist, ref[0])
    huge_rerank = small.search(queries[:2], k=10_000_000, rerank_from=1)
    np.testing.assert_array_equal(huge_rerank[1], ref[1])


def test_rerank_from_equals_brute_force_rerank_of_prefix_shortlist(
    index, codebooks, codes, queries
):
    shortlist = 30
    dist, ids = index.search(queries, k=10, rerank_from=1, rerank_candidates=shortlist)
    _, short_ids = index.search(queries, k=shortlist, num_levels=1)
    full = reconstruct(codebooks, codes)
    for q in range(len(queries)):
        candidates = np.sort(short_ids[q])  # ties of the reference by position, like the index
        ref_dist, order = brute_force(queries[q : q + 1], full[candidates], 10)
        np.testing.assert_array_equal(ids[q], candidates[order[0]])
        np.testing.assert_allclose(dist[q], ref_dist[0], atol=1e-4)
    # a shortlist holding every item gives the exhaustive result
    everything = index.search(queries, k=10, rerank_from=2, rerank_candidates=N)
    exhaustive = index.search(queries, k=10)
    np.testing.assert_array_equal(everything[1], exhaustive[1])
    np.testing.assert_allclose(everything[0], exhaustive[0], rtol=1e-5, atol=1e-5)


def test_uint16_codes_for_codebook_size_above_256(rng):
    books = rng.standard_normal((2, 300, 5)).astype(np.float32)
    many = rng.integers(0, 300, size=(400, 2))
    built = DPQIndex(books)
    built.add(many)
    assert built.codes.dtype == np.uint16
    q = rng.standard_normal((4, 5)).astype(np.float32)
    for levels in (1, 2):
        dist, ids = built.search(q, k=9, num_levels=levels)
        ref_dist, ref_ids = brute_force(q, reconstruct(books, many[:, :levels]), 9)
        assert_same_ranking(dist, ids, ref_dist, ref_ids)


def test_more_than_four_levels_use_several_code_words(rng):
    books = (rng.standard_normal((6, 16, 4)) * 0.7 ** np.arange(6)[:, None, None]).astype(
        np.float32
    )
    many = rng.integers(0, 16, size=(200, 6))
    built = DPQIndex(books)
    built.add(many)
    q = rng.standard_normal((3, 4)).astype(np.float32)
    dist, ids = built.search(q, k=10)
    ref_dist, ref_ids = brute_force(q, reconstruct(books, many), 10)
    assert_same_ranking(dist, ids, ref_dist, ref_ids)


# ------------------------------------------------------------------ partitioned index


def cells_reference(codes: np.ndarray, levels: int) -> np.ndarray:
    """Cell of each row: its first ``levels`` codes as one number, first most significant."""
    cells = np.zeros(len(codes), np.int64)
    for level in range(levels):
        cells = cells * K + codes[:, level]
    return cells


def probe_reference(queries, codebooks, codes, k, nprobe, cell_levels, levels, mode="aqd"):
    """Brute force restricted to the items of the nprobe cells whose prefix reconstruction
    is nearest (float64; ties among cells by cell number, among items by position)."""
    cells = cells_reference(codes, cell_levels)
    present = np.unique(cells)
    centroids = reconstruct(
        codebooks,
        np.stack([present // K ** (cell_levels - 1 - i) % K for i in range(cell_levels)], axis=1),
    )
    _, best_cells = brute_force(queries, centroids, min(nprobe, len(present)), mode)
    database = reconstruct(codebooks, codes[:, :levels])
    out_d, out_i = [], []
    for q in range(len(queries)):
        rows = np.flatnonzero(np.isin(cells, present[best_cells[q]]))
        dist, order = brute_force(queries[q : q + 1], database[rows], min(k, len(rows)), mode)
        pad = k - order.shape[1]
        out_d.append(np.concatenate([dist[0], np.full(pad, np.inf)]))
        out_i.append(np.concatenate([rows[order[0]], np.full(pad, -1)]))
    return np.array(out_d), np.array(out_i)


def build_in_chunks(codebooks, codes, partition_levels, chunks=4, **kwargs) -> DPQIndex:
    built = DPQIndex(codebooks, partition_levels=partition_levels, **kwargs)
    for part in np.array_split(np.arange(len(codes)), chunks):
        built.add(codes[part], ids=part)
    return built


@pytest.mark.parametrize("partition_levels", [1, 2])
@pytest.mark.parametrize("mode", ["aqd", "ip"])
def test_nprobe_over_all_cells_returns_exactly_the_exhaustive_results(
    codebooks, codes, queries, partition_levels, mode
):
    flat = DPQIndex(codebooks)
    flat.add(codes)
    part = build_in_chunks(codebooks, codes, partition_levels)
    for levels in range(1, L + 1):
        exhaustive = part.search(queries, 25, num_levels=levels, mode=mode)
        all_cells = part.search(queries, 25, num_levels=levels, mode=mode, nprobe=K**2)
        np.testing.assert_array_equal(all_cells[1], exhaustive[1])
        np.testing.assert_array_equal(all_cells[0], exhaustive[0])
        # the same scores as the unpartitioned index, bit for bit; ids up to tie order
        unpartitioned = flat.search(queries, 25, num_levels=levels, mode=mode)
        np.testing.assert_array_equal(exhaustive[0], unpartitioned[0])
        assert_same_ranking(*exhaustive, *unpartitioned, tol=0)


@pytest.mark.parametrize("partition_levels", [1, 2])
@pytest.mark.parametrize("mode", ["aqd", "ip"])
def test_nprobe_scans_exactly_the_nearest_cells(codebooks, codes, queries, partition_levels, mode):
    part = build_in_chunks(codebooks, codes, partition_levels)
    for nprobe in (1, 3):
        dist, ids = part.search(queries, 12, mode=mode, nprobe=nprobe)
        ref_d, ref_i = probe_reference(
            queries, codebooks, codes, 12, nprobe, partition_levels, L, mode
        )
        assert_same_ranking(dist, ids, ref_d, ref_i)
        assert np.array_equal(ids < 0, np.isinf(dist))


def test_recall_of_the_exhaustive_top_k_grows_with_nprobe(codebooks, codes, queries):
    part = build_in_chunks(codebooks, codes, 2)
    exact = part.search(queries, 20)[1]
    recall = []
    for nprobe in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        found = part.search(queries, 20, nprobe=nprobe)[1]
        recall.append(
            np.mean([len(set(a) & set(b)) / 20 for a, b in zip(found, exact, strict=True)])
        )
    assert recall[0] < 0.5 and recall[-1] == 1.0
    assert all(b >= a for a, b in itertools.pairwise(recall)), recall


def test_cells_fewer_items_than_k_are_padded(codebooks, codes, queries):
    part = build_in_chunks(codebooks, codes, 2)
    dist, ids = part.search(queries, 50, nprobe=1)  # a cell of 16^2 holds ~1 item here
    assert ids.shape == (len(queries), 50)
    assert np.all((ids < 0) == np.isinf(dist)) and (ids < 0).any()
    assert all(np.all(np.diff(np.flatnonzero(row >= 0)) == 1) for row in ids)  # padding last


def assert_grouped(index: DPQIndex) -> None:
    """Items contiguous per cell, offsets matching, insertion (id) order inside each cell."""
    cells = cells_reference(index.codes, index.partition_levels)
    assert np.all(np.diff(cells) >= 0)
    counts = np.bincount(cells, minlength=K**index.partition_levels)
    np.testing.assert_array_equal(np.diff(index.cell_offsets), counts)
    for cell in np.unique(cells):
        assert np.all(np.diff(index.ids[cells == cell]) > 0)


@pytest.mark.parametrize("partition_levels", [1, 2])
def test_grouping_survives_add_remove_save_load(
    tmp_path, codebooks, codes, queries, partition_levels
):
    part = build_in_chunks(codebooks, codes[:200], partition_levels, chunks=3)
    assert_grouped(part)
    part.remove(np.arange(0, 200, 3))
    assert_grouped(part)
    part.add(codes[200:], ids=np.arange(200, N))
    part.remove([201, 299])
    assert_grouped(part)
    kept = np.setdiff1d(np.arange(N), np.concatenate([np.arange(0, 200, 3), [201, 299]]))
    assert sorted(part.ids) == kept.tolist()
    before = part.search(queries, 15, nprobe=3)
    loaded = DPQIndex.load(part.save(tmp_path / "part.npz"))
    assert loaded.partition_levels == partition_levels
    assert_grouped(loaded)
    np.testing.assert_array_equal(loaded.cell_offsets, part.cell_offsets)
    after = loaded.search(queries, 15, nprobe=3)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    ref_d, ref_i = probe_reference(queries, codebooks, codes[kept], 15, 3, partition_levels, L)
    assert_same_ranking(*after, ref_d, ids_of(ref_i, kept))
    loaded.add(codes[:5], ids=np.arange(1000, 1005))  # a loaded index keeps growing grouped
    assert_grouped(loaded)


def test_prefix_search_and_rerank_with_nprobe(codebooks, codes, queries):
    part = build_in_chunks(codebooks, codes, 2)
    # a prefix shorter than the partition: cells of the first num_levels codes
    dist, ids = part.search(queries, 10, num_levels=1, nprobe=2)
    ref = probe_reference(queries, codebooks, codes, 10, 2, 1, 1)
    assert_same_ranking(dist, ids, *ref)
    dist, ids = part.search(queries, 10, num_levels=3, nprobe=5)
    ref = probe_reference(queries, codebooks, codes, 10, 5, 2, 3)
    assert_same_ranking(dist, ids, *ref)
    # rerank: the shortlist comes from the probed cells, then full codes decide
    dist, ids = part.search(queries, 10, rerank_from=2, rerank_candidates=40, nprobe=8)
    _, short = part.search(queries, 40, num_levels=2, nprobe=8)
    full = reconstruct(codebooks, codes)
    for q in range(len(queries)):
        candidates = short[q][short[q] >= 0]
        rows = np.sort(np.flatnonzero(np.isin(part.ids, candidates)))  # index order
        ref_d, order = brute_force(queries[q : q + 1], full[part.ids[rows]], 10)
        np.testing.assert_array_equal(ids[q], part.ids[rows][order[0]])


def test_cell_search_split_over_threads_equals_single_thread(
    codebooks, codes, queries, monkeypatch
):
    part = build_in_chunks(codebooks, codes, 1)
    serial = part.search(queries[:1], 30, nprobe=5)
    monkeypatch.setattr(kernels, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(kernels.numba, "get_num_threads", lambda: 3)
    sharded = part.search(queries[:1], 30, nprobe=5)  # one query: cells split over threads
    by_queries = part.search(queries, 30, nprobe=5)
    np.testing.assert_array_equal(sharded[1], serial[1])
    np.testing.assert_array_equal(sharded[0], serial[0])
    np.testing.assert_array_equal(by_queries[1][:1], serial[1])


def test_repartition_regroups_and_keeps_results(codebooks, codes, queries):
    flat = build_in_chunks(codebooks, codes, 0)
    before = flat.search(queries, 20)
    flat.repartition(2)
    assert_grouped(flat)
    after = flat.search(queries, 20)
    assert_same_ranking(*after, *before, tol=0)
    flat.repartition(0)  # one cell again (the items keep their current order)
    assert flat.cell_offsets.tolist() == [0, N]
    assert_same_ranking(*flat.search(queries, 20), *before, tol=0)
    with pytest.raises(ValueError, match="nprobe needs a partitioned index"):
        flat.search(queries, 20, nprobe=1)


def test_partition_and_nprobe_are_checked(codebooks, queries, index):
    with pytest.raises(ValueError, match="nprobe needs a partitioned index"):
        index.search(queries, 3, nprobe=4)
    part = DPQIndex(codebooks, partition_levels=1)
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="nprobe must be"):
            part.search(queries, 3, nprobe=bad)
    for bad in (3, -1, 1.0):
        with pytest.raises(ValueError, match="partition_levels must be"):
            DPQIndex(codebooks, partition_levels=bad)
    with pytest.raises(ValueError, match="at most num_levels=1"):
        DPQIndex(codebooks[:1], partition_levels=2)
    big = np.zeros((2, 65536, 2), np.float32)
    with pytest.raises(ValueError, match="use partition_levels=1"):
        DPQIndex(big, partition_levels=2)


def test_adding_in_chunks_grows_storage_geometrically(codebooks, rng):
    """Appending m items costs O(m): the arrays are reallocated O(log N) times, not per add."""
    built = DPQIndex(codebooks, partition_levels=1)
    addresses = set()
    for _ in range(400):
        built.add(rng.integers(0, K, size=(25, L)))
        addresses.add(built.store.codes.__array_interface__["data"][0])
    assert built.ntotal == 10_000 and len(addresses) <= 10
    built.reserve(20_000)
    address = built.store.codes.__array_interface__["data"][0]
    built.add(rng.integers(0, K, size=(10_000, L)))
    assert built.store.codes.__array_interface__["data"][0] == address
    assert_grouped(built)


def test_reserve_on_an_empty_index_allocates_once(codebooks, rng):
    built = DPQIndex(codebooks, partition_levels=2)
    built.reserve(1000)
    built.add(rng.integers(0, K, size=(10, L)))
    address = built.store.codes.__array_interface__["data"][0]
    for _ in range(99):
        built.add(rng.integers(0, K, size=(10, L)))
    assert built.store.codes.__array_interface__["data"][0] == address
    assert built.ntotal == 1000 and built.store.capacity == 1000
    assert_grouped(built)


def test_concurrent_searches_of_an_index_with_waiting_items_agree(codebooks, codes, queries):
    """Searches run on several threads (as in a service); the first ones merge the items
    added since the last read into their cells, one at a time."""
    reference = build_in_chunks(codebooks, codes, 2)
    expected = reference.search(queries, 10, nprobe=6)
    for _ in range(3):
        part = DPQIndex(codebooks, partition_levels=2)
        part.add(codes, ids=np.arange(N))  # waiting to be grouped

        def search(_, part=part):
            return part.search(queries, 10, nprobe=6)

        pool = ThreadPoolExecutor(max_workers=6)
        try:  # bounded: a deadlocked search raises TimeoutError here instead of hanging
            results = list(pool.map(search, range(12), timeout=60))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        for dist, ids in results:
            np.testing.assert_array_equal(ids, expected[1])
            np.testing.assert_array_equal(dist, expected[0])


def test_version1_file_still_loads_and_searches_identically(tmp_path, codebooks, codes, queries):
    built = DPQIndex(codebooks, metadata={"model": "m"}, search_mode="ip")
    built.add(codes, ids=np.arange(N) * 2 + 1, labels=np.arange(N) % 4)
    path = write_version1_file(built, tmp_path / "v1.npz")
    for mmap in (False, True):
        loaded = DPQIndex.load(path, mmap=mmap)
        assert loaded.search_mode == "ip" and loaded.metadata == {"model": "m"}
        np.testing.assert_array_equal(loaded.labels, built.labels)
        for a, b in zip(loaded.search(queries, 10), built.search(queries, 10), strict=True):
            np.testing.assert_array_equal(a, b)
    resaved = DPQIndex.load(loaded.save(tmp_path / "v2.npz"))
    np.testing.assert_array_equal(resaved.ids, built.ids)


# ------------------------------------------------------------------ encoding, add, remove


def greedy_reference(x, books, assignment):
    """Per-row loop: x_1 = x, code_l = argmin ||x_l - C_l[k]|| (or argmax cosine)."""
    codes = np.zeros((len(x), len(books)), np.int64)
    for i, row in enumerate(x.astype(np.float64)):
        residual = row.copy()
        for level, book in enumerate(books.astype(np.float64)):
            if assignment == "euclidean":
                choice = int(np.argmin(((residual - book) ** 2).sum(1)))
            else:
                cos = book @ residual / (np.linalg.norm(book, axis=1) * np.linalg.norm(residual))
                choice = int(np.argmax(cos))
            codes[i, level] = choice
            residual -= book[choice]
    return codes


@pytest.mark.parametrize("assignment", ["euclidean", "cosine"])
def test_add_features_uses_greedy_residual_assignment(codebooks, rng, assignment):
    x = rng.standard_normal((60, D)).astype(np.float32)
    built = DPQIndex(codebooks, assignment=assignment)
    built.add_features(x)
    np.testing.assert_array_equal(built.codes, greedy_reference(x, codebooks, assignment))
    np.testing.assert_array_equal(
        greedy_residual_encode(x, codebooks, assignment, num_levels=2), built.codes[:, :2]
    )


def test_remove_drops_items_and_the_rest_still_match_brute_force(index, codebooks, codes, queries):
    gone = np.arange(0, N, 3)
    assert index.remove(np.append(gone, [10_000])) == len(gone)
    assert index.ntotal == N - len(gone)
    kept = np.setdiff1d(np.arange(N), gone)
    dist, ids = index.search(queries, k=10)
    ref_dist, ref_rows = brute_force(queries, reconstruct(codebooks, codes[kept]), 10)
    np.testing.assert_array_equal(ids, kept[ref_rows])
    np.testing.assert_allclose(dist, ref_dist, atol=1e-4)
    assert index.remove([0]) == 0
    assert index.add(codes[:2]).tolist() == [N, N + 1]  # new ids continue after the largest


def test_labels_follow_items_and_are_looked_up_by_id(codebooks, codes):
    labels = np.arange(N) % 7
    built = DPQIndex(codebooks)
    built.add(codes, ids=np.arange(N) * 2, labels=labels)
    built.remove([0, 2])
    np.testing.assert_array_equal(built.labels_of([[4, 6], [-1, 999]]), [[2, 3], [-1, -1]])
    multi = DPQIndex(codebooks)
    multi.add(codes[:3], labels=np.eye(3, dtype=bool))
    assert multi.labels_of([1]).tolist() == [[0, 1, 0]]


# ------------------------------------------------------------------ persistence


def test_save_load_round_trip_keeps_everything_and_search_results(
    tmp_path, codebooks, codes, queries
):
    built = DPQIndex(codebooks, assignment="cosine", metadata={"model": "m", "bits": [8, 32]})
    built.add(codes, ids=np.arange(N) + 1000, labels=np.arange(N) % 5)
    built.remove([1000, 1001])
    path = built.save(tmp_path / "sub" / "index.npz")
    assert [p.name for p in path.parent.iterdir()] == ["index.npz"]  # no temp file left
    loaded = DPQIndex.load(path)
    np.testing.assert_array_equal(loaded.codebooks, built.codebooks)
    np.testing.assert_array_equal(loaded.codes, built.codes)
    np.testing.assert_array_equal(loaded.ids, built.ids)
    np.testing.assert_array_equal(loaded.labels, built.labels)
    assert loaded.metadata == built.metadata and loaded.assignment == "cosine"
    for levels in (1, 4):
        a, b = (
            built.search(queries, 10, num_levels=levels),
            loaded.search(queries, 10, num_levels=levels),
        )
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
    assert loaded.add(codes[:1], labels=[0]).tolist() == [N + 1000]


def write_version1_file(index: DPQIndex, path: Path, drop: tuple[str, ...] = ()) -> Path:
    """An index file as DPQIndex.save wrote it in format version 1 (before partitioning):
    np.savez of codebooks, codes (N, L), ids, labels and a header whose checksum is one
    sha256 over the header text and every array in name order. ``drop``: header keys that
    older version-1 files lacked."""
    arrays = {"codebooks": index.codebooks, "codes": np.ascontiguousarray(index.codes)}
    arrays["ids"] = np.ascontiguousarray(index.ids)
    if index.labels is not None:
        arrays["labels"] = index.labels
    header = {
        "format": "dpq-index",
        "format_version": 1,
        "num_levels": index.num_levels,
        "codebook_size": index.codebook_size,
        "dim": index.dim,
        "ntotal": index.ntotal,
        "assignment": index.assignment,
        "search_mode": index.search_mode,
        "codebook_sha256": index.codebook_sha256,
        "next_id": index.next_id,
        "has_labels": index.labels is not None,
        "metadata": index.metadata,
    }
    for key in drop:
        del header[key]
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    header["checksum_sha256"] = digest.hexdigest()
    arrays["header"] = np.array(json.dumps(header, sort_keys=True))
    np.savez(path, **arrays)
    return path


def _rewrite_npz(source: Path, target: Path, change) -> None:
    with np.load(source, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    change(arrays)
    np.savez(target, **arrays)


def test_truncated_index_file_is_a_value_error_naming_the_file(tmp_path, index):
    path = index.save(tmp_path / "index.npz")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFileError, match="truncated.npz"):
        DPQIndex.load(truncated)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="garbage.npz"):
        DPQIndex.load(garbage)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        DPQIndex.load(tmp_path / "missing.npz")


def test_tampered_codes_or_header_fail_the_checksum(tmp_path, index):
    path = index.save(tmp_path / "index.npz")

    def flip_a_code(arrays):
        arrays["codes"] = arrays["codes"].copy()
        arrays["codes"][3, 1] ^= 1

    _rewrite_npz(path, tmp_path / "codes.npz", flip_a_code)
    with pytest.raises(IndexFileError, match=r"codes\.npz failed its checksum"):
        DPQIndex.load(tmp_path / "codes.npz")

    def change_assignment(arrays):
        header = json.loads(str(arrays["header"]))
        header["assignment"] = "cosine"
        arrays["header"] = np.array(json.dumps(header))

    _rewrite_npz(path, tmp_path / "header.npz", change_assignment)
    with pytest.raises(IndexFileError, match="checksum"):
        DPQIndex.load(tmp_path / "header.npz")
    # bytes changed inside the zip member: zip CRC or checksum, either way a clear error
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("codes.npy")
    raw[info.header_offset + 200] ^= 0xFF
    (tmp_path / "bytes.npz").write_bytes(bytes(raw))
    with pytest.raises(IndexFileError, match="bytes.npz"):
        DPQIndex.load(tmp_path / "bytes.npz")


def test_other_format_version_is_a_clear_error(tmp_path, index):
    path = index.save(tmp_path / "index.npz")

    def bump(arrays):
        header = json.loads(str(arrays["header"]))
        header["format_version"] = 99
        arrays["header"] = np.array(json.dumps(header))

    _rewrite_npz(path, tmp_path / "v99.npz", bump)
    with pytest.raises(
        IndexFileError, match=r"v99\.npz has index format version 99.*reads versions \[1, 2\]"
    ):
        DPQIndex.load(tmp_path / "v99.npz")


# ------------------------------------------------------------------ faiss interop


@pytest.mark.parametrize("custom_ids", [False, True])
def test_to_faiss_lookup_table_search_returns_the_same_ids(index, codes, queries, custom_ids):
    if custom_ids:
        index = DPQIndex(index.codebooks)
        index.add(codes, ids=np.arange(N) * 3 + 7)
    exported = index.to_faiss()
    if not custom_ids:
        assert exported.rq.search_type == faiss.AdditiveQuantizer.ST_norm_float
    f_dist, f_ids = exported.search(queries, 25)
    dist, ids = index.search(queries, 25)
    assert_same_ranking(dist, ids, f_dist, f_ids)
    np.testing.assert_array_equal(ids, f_ids)


def test_to_faiss_inner_product_mode_returns_the_same_ids(index, queries):
    f_sim, f_ids = index.to_faiss(mode="ip").search(queries, 10)
    dist, ids = index.search(queries, 10, mode="ip")
    np.testing.assert_array_equal(ids, f_ids)
    np.testing.assert_allclose(-dist, f_sim, atol=1e-4)


def test_from_faiss_reads_a_trained_residual_quantizer(rng):
    train = rng.standard_normal((2000, 8)).astype(np.float32)
    trained = faiss.IndexResidualQuantizer(8, 2, 8)
    trained.rq.train_type = faiss.ResidualQuantizer.Train_default
    trained.rq.max_beam_size = 1  # greedy encoding, the same rule as DPQIndex
    trained.train(train)
    trained.add(train[:500])
    q = rng.standard_normal((6, 8)).astype(np.float32)
    f_dist, f_ids = trained.search(q, 10)
    imported = DPQIndex.from_faiss(trained)
    assert imported.ntotal == 500 and imported.codebooks.shape == (2, 256, 8)
    dist, ids = imported.search(q, 10)
    assert_same_ranking(dist, ids, f_dist, f_ids)
    np.testing.assert_array_equal(imported.encode(train[:50]), imported.codes[:50])
    back = DPQIndex.from_faiss(imported.to_faiss())
    np.testing.assert_array_equal(back.codes, imported.codes)
    with pytest.raises(ValueError, match="IndexResidualQuantizer"):
        DPQIndex.from_faiss(faiss.IndexFlatL2(8))


def faiss_as_dpq(dist: np.ndarray, ids: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """faiss results in DPQ's convention: negated inner products, (inf, -1) padding."""
    out = np.where(ids < 0, np.inf, -dist if mode == "ip" else dist).astype(np.float32)
    return out, ids


@pytest.mark.parametrize("partition_levels", [1, 2])
@pytest.mark.parametrize("mode", ["aqd", "ip"])
def test_faiss_ivf_export_returns_the_partitioned_results_for_the_same_nprobe(
    codebooks, queries, partition_levels, mode
):
    """nprobe counts non-empty cells, faiss counts lists: equal when no cell is empty."""
    many = np.random.default_rng(5).integers(0, K, size=(3000, L))  # ~12 per cell of 16^2
    part = build_in_chunks(codebooks, many, partition_levels, search_mode=mode)
    assert np.all(np.diff(part.cell_offsets) > 0)
    ivf = part.to_faiss(ivf=True)
    assert isinstance(ivf, faiss.IndexIVFResidualQuantizer)
    assert ivf.nlist == K**partition_levels and ivf.ntotal == len(many)
    for nprobe in (1, 4, K**partition_levels):
        ivf.nprobe = nprobe
        f_dist, f_ids = faiss_as_dpq(*ivf.search(queries, 15), mode)
        dist, ids = part.search(queries, 15, nprobe=nprobe)
        assert_same_ranking(dist, ids, f_dist, f_ids)
    back = DPQIndex.from_faiss(ivf)  # no re-encoding either way
    assert back.partition_levels == partition_levels and back.search_mode == mode
    np.testing.assert_array_equal(back.codebooks, part.codebooks)
    np.testing.assert_array_equal(back.codes, part.codes)
    np.testing.assert_array_equal(back.ids, part.ids)


def test_faiss_ivf_export_of_an_unpartitioned_index_uses_the_first_level(index, queries):
    ivf = index.to_faiss(ivf=True)
    assert ivf.nlist == K and ivf.rq.M == L - 1
    ivf.nprobe = 2
    part = DPQIndex(index.codebooks, partition_levels=1)
    part.add(index.codes)
    assert_same_ranking(*part.search(queries, 10, nprobe=2), *ivf.search(queries, 10))
    with pytest.raises(ValueError, match="at least one level after"):
        DPQIndex(index.codebooks[:2], partition_levels=2).to_faiss(ivf=True)


@pytest.mark.parametrize("mode", ["aqd", "ip"])
def test_faiss_ivf_on_disk_lists_load_memory_mapped(
    tmp_path, codebooks, codes, queries, monkeypatch, mode
):
    monkeypatch.setattr(faiss_interop, "_ONDISK_SHARD_ITEMS", 70)  # several shards merged
    part = build_in_chunks(codebooks, codes, 1, search_mode=mode)
    path = write_faiss_ivf_ondisk(part, tmp_path / "ivf.faiss")
    data_files = list(tmp_path.glob("ivf.faiss.*.ivfdata"))
    assert len(data_files) == 1
    moved = tmp_path / "moved"  # the pair is found wherever it goes
    moved.mkdir()
    for file in (path, data_files[0]):
        file.rename(moved / file.name)
    loaded = load_faiss_index(moved / "ivf.faiss")
    invlists = faiss.extract_index_ivf(loaded).invlists
    assert "OnDisk" in type(faiss.downcast_InvertedLists(invlists)).__name__
    faiss.extract_index_ivf(loaded).nprobe = 3
    f_dist, f_ids = faiss_as_dpq(*loaded.search(queries, 12), mode)
    assert_same_ranking(*part.search(queries, 12, nprobe=3), f_dist, f_ids)
    back = DPQIndex.from_faiss(loaded)
    np.testing.assert_array_equal(back.codes, part.codes)
    np.testing.assert_array_equal(back.ids, part.ids)
    # rewriting replaces the data file; a single-file IVF index maps with IO_FLAG_MMAP
    write_faiss_ivf_ondisk(part, moved / "ivf.faiss")
    assert len(list(moved.glob("ivf.faiss.*.ivfdata"))) == 1
    faiss.write_index(part.to_faiss(ivf=True), str(tmp_path / "single.faiss"))
    single = load_faiss_index(tmp_path / "single.faiss", mmap=True)
    faiss.extract_index_ivf(single).nprobe = 3
    np.testing.assert_array_equal(single.search(queries, 12)[1], f_ids)
    with pytest.raises(FileNotFoundError):
        load_faiss_index(tmp_path / "absent.faiss")
    (tmp_path / "bad.faiss").write_bytes(b"not faiss")
    with pytest.raises(IndexFileError, match="bad.faiss is not a readable faiss index"):
        load_faiss_index(tmp_path / "bad.faiss")


# ------------------------------------------------------------------ memory-mapped files


def backed_by_a_map(arr) -> bool:
    """Whether an array's memory is a np.memmap (somewhere down its chain of bases)."""
    while arr is not None:
        if isinstance(arr, np.memmap):
            return True
        arr = getattr(arr, "base", None)
    return False


def test_memory_mapped_load_searches_identically_to_an_in_memory_load(
    tmp_path, codebooks, codes, queries
):
    part = build_in_chunks(codebooks, codes, 2, search_mode="ip")
    part_labels = DPQIndex(codebooks, partition_levels=2, search_mode="ip")
    part_labels.add(part.codes, ids=part.ids, labels=part.ids % 3)
    path = part_labels.save(tmp_path / "mapped.npz")
    in_memory = DPQIndex.load(path)
    mapped = DPQIndex.load(path, mmap=True)
    assert mapped.read_only and not in_memory.read_only
    assert all(backed_by_a_map(getattr(mapped.store, name)) for name in ("codes", "ids", "labels"))
    assert not backed_by_a_map(in_memory.store.codes)
    for name in ("codes", "ids", "labels", "cell_offsets"):
        np.testing.assert_array_equal(getattr(mapped, name), getattr(in_memory, name))
    for kwargs in ({}, {"nprobe": 5}, {"num_levels": 2}, {"rerank_from": 1}, {"mode": "aqd"}):
        for a, b in zip(
            mapped.search(queries, 20, **kwargs),
            in_memory.search(queries, 20, **kwargs),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(mapped.labels_of([0, 5, -1]), in_memory.labels_of([0, 5, -1]))
    with pytest.raises(ValueError, match="memory-mapped from .*mapped.npz and read-only"):
        mapped.add(codes[:1])
    with pytest.raises(ValueError, match="read-only"):
        mapped.remove([0])
    resaved = DPQIndex.load(mapped.save(tmp_path / "copy.npz"))  # a mapped index saves
    np.testing.assert_array_equal(resaved.codes, in_memory.codes)


def test_index_file_arrays_are_aligned_and_checked_when_mapped(tmp_path, index):
    path = index.save(tmp_path / "index.npz")
    members = storage._members(path)
    assert all(m.offset % 64 == 0 for m in members.values())
    raw = bytearray(path.read_bytes())
    raw[members["codes"].offset + 5] ^= 0x01  # one bit of one code, zip CRC untouched
    (tmp_path / "flipped.npz").write_bytes(bytes(raw))
    for mmap in (False, True):
        with pytest.raises(
            IndexFileError, match=r"flipped\.npz failed its checksum \(array 'codes'\)"
        ):
            DPQIndex.load(tmp_path / "flipped.npz", mmap=mmap)
    unchecked = DPQIndex.load(tmp_path / "flipped.npz", mmap=True, verify=False)
    assert not np.array_equal(unchecked.codes, index.codes)  # verify=False trusts the bytes


def test_block_digest_is_independent_of_how_the_bytes_arrive(monkeypatch):
    monkeypatch.setattr(storage, "HASH_BLOCK", 1000)
    arr = np.arange(5000, dtype=np.int64)  # 40 blocks
    whole = storage.array_digest("ids", arr)
    hasher = storage.BlockHasher(storage._member_prefix("ids", arr.dtype, arr.shape))
    for piece in np.array_split(arr, 7):
        hasher.update(memoryview(piece.view(np.uint8)))
    assert hasher.hexdigest() == whole
    assert storage.array_digest("ids", arr + (arr == 4321)) != whole


# ------------------------------------------------------------------ appending and merging files


def assert_same_index(
    index: DPQIndex, expected: DPQIndex, queries: np.ndarray, nprobe: int | None
) -> None:
    """The same stored arrays and the same search results (top 10, ``nprobe`` cells)."""
    for name in ("codes", "ids", "labels", "cell_offsets"):
        np.testing.assert_array_equal(getattr(index, name), getattr(expected, name))
    for a, b in zip(
        index.search(queries, 10, nprobe=nprobe),
        expected.search(queries, 10, nprobe=nprobe),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("partition_levels", [0, 2])
def test_appending_to_a_file_equals_adding_to_the_index(
    tmp_path, codebooks, codes, queries, monkeypatch, partition_levels
):
    monkeypatch.setattr(files, "_BLOCK_ITEMS", 40)  # stream in many blocks
    labels = np.arange(N) % 7
    whole = DPQIndex(codebooks, partition_levels=partition_levels)
    whole.add(codes, labels=labels)
    start = DPQIndex(codebooks, partition_levels=partition_levels)
    start.add(codes[:100], labels=labels[:100])
    path = start.save(tmp_path / "grow.npz")
    assert append_to_index_file(path, codes[100:250], labels=labels[100:250]).tolist() == list(
        range(100, 250)
    )
    append_to_index_file(path, codes[250:], labels=labels[250:])
    grown = DPQIndex.load(path)
    assert_same_index(grown, whole, queries, nprobe=3 if partition_levels else None)
    assert grown.next_id == N
    with pytest.raises(ValueError, match="already in"):
        append_to_index_file(path, codes[:2], ids=[5, 10_000], labels=[0, 0])
    with pytest.raises(ValueError, match="has labels"):
        append_to_index_file(path, codes[:2])
    with pytest.raises(ValueError, match="codes out of range"):
        append_to_index_file(path, codes[:2] + K, labels=[0, 0])
    assert DPQIndex.load(path).ntotal == N  # failed appends leave the file as it was


def test_appending_to_a_version1_file_writes_version2(tmp_path, codebooks, codes):
    old = DPQIndex(codebooks)
    old.add(codes[:50])
    path = write_version1_file(old, tmp_path / "v1.npz")
    append_to_index_file(path, codes[50:60])
    grown = DPQIndex.load(path, mmap=True)
    assert grown.ntotal == 60 and grown.read_only
    np.testing.assert_array_equal(grown.codes, codes[:60])


@pytest.mark.parametrize("partition_levels", [0, 1, 2])
def test_merging_files_equals_one_index_built_from_all_items(
    tmp_path, codebooks, codes, queries, monkeypatch, partition_levels
):
    monkeypatch.setattr(files, "_BLOCK_ITEMS", 50)
    labels = np.arange(N) % 3
    whole = DPQIndex(codebooks, partition_levels=partition_levels, metadata={"m": 1})
    whole.add(codes, labels=labels)
    paths = []
    for i, part in enumerate(np.array_split(np.arange(N), 3)):
        piece = DPQIndex(codebooks, partition_levels=partition_levels, metadata={"m": 1})
        piece.add(codes[part], labels=labels[part])  # each slice numbered from 0
        paths.append(piece.save(tmp_path / f"slice{i}.npz"))
    merged = DPQIndex.load(merge_index_files(paths, tmp_path / "all.npz", renumber_ids=True))
    assert_same_index(merged, whole, queries, nprobe=4 if partition_levels else None)
    assert merged.next_id == N and merged.metadata["merged_from"] == [str(p) for p in paths]
    with pytest.raises(ValueError, match="appear in more than one input"):
        merge_index_files(paths, tmp_path / "clash.npz")  # the same ids 0.. in each slice


def test_merging_files_of_different_codebooks_or_settings_is_refused(tmp_path, codebooks, codes):
    first = DPQIndex(codebooks)
    first.add(codes[:10])
    other_books = DPQIndex(codebooks * 2)
    other_books.add(codes[10:20], ids=np.arange(10, 20))
    other_mode = DPQIndex(codebooks, search_mode="ip")
    other_mode.add(codes[10:20], ids=np.arange(10, 20))
    a = first.save(tmp_path / "a.npz")
    for name, other, message in (
        ("books", other_books, "other codebooks"),
        ("mode", other_mode, "search_mode='ip'"),
    ):
        b = other.save(tmp_path / f"{name}.npz")
        with pytest.raises(ValueError, match=message):
            merge_index_files([a, b], tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


# ------------------------------------------------------------------ bad input


def test_query_of_wrong_dimension_names_expected_and_actual(index):
    with pytest.raises(ValueError, match=f"dimension 5 but the index expects dim {D}"):
        index.search(np.zeros((2, 5), np.float32), 3)
    with pytest.raises(ValueError, match=r"queries\[None, :\]"):
        index.search(np.zeros(D, np.float32), 3)


def test_nan_or_inf_in_queries_is_rejected(index, queries):
    bad = queries.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or inf.*row 2"):
        index.search(bad, 3)
    bad[2, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        index.search(bad, 3)


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "10", None])
def test_k_must_be_a_positive_integer(index, queries, k):
    with pytest.raises(ValueError, match="k must be"):
        index.search(queries, k)


@pytest.mark.parametrize("k", [2**31, 10**30, np.int64(2**40)])
def test_k_beyond_the_documented_bound_is_a_clear_error(index, queries, k):
    with pytest.raises(ValueError, match=r"k=\d+ is beyond the largest accepted value 2147483647"):
        index.search(queries, k)


@pytest.mark.parametrize("levels", [0, L + 1])
def test_num_levels_out_of_range(index, queries, levels):
    with pytest.raises(ValueError, match=rf"num_levels must be in 1\.\.{L}.*got {levels}"):
        index.search(queries, 3, num_levels=levels)


def test_rerank_from_and_mode_are_checked(index, queries):
    with pytest.raises(ValueError, match="rerank_from must be smaller than num_levels=2"):
        index.search(queries, 3, num_levels=2, rerank_from=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        index.search(queries, 3, mode="cosine")


def test_search_settings_in_one_parameters_object_equal_the_keywords(codebooks, codes, queries):
    part = build_in_chunks(codebooks, codes, 1)
    params = SearchParameters(num_levels=3, nprobe=4, rerank_from=1, rerank_candidates=30)
    by_object = part.search(queries, 10, params=params)
    by_keywords = part.search(
        queries, 10, num_levels=3, nprobe=4, rerank_from=1, rerank_candidates=30
    )
    np.testing.assert_array_equal(by_object[1], by_keywords[1])
    np.testing.assert_array_equal(by_object[0], by_keywords[0])
    with pytest.raises(ValueError, match="either in params or as keywords"):
        part.search(queries, 10, nprobe=2, params=params)
    with pytest.raises(ValueError, match="nprobe needs a partitioned index"):
        DPQIndex(codebooks).search(queries, 3, params=params)


def test_codes_out_of_range_for_codebook_size(index, codes):
    bad = codes.astype(np.int64)
    bad[5, 2] = K
    with pytest.raises(
        ValueError, match=rf"out of range for codebook_size K={K}.*got min 0 and max {K}.*level: 2"
    ):
        index.add(bad)
    with pytest.raises(ValueError, match="out of range"):
        index.add(-codes.astype(np.int64) - 1)
    with pytest.raises(ValueError, match=rf"shape \(N, {L}\)"):
        index.add(codes[:, :2])
    with pytest.raises(ValueError, match="integers"):
        index.add(codes.astype(np.float32))
    assert index.ntotal == N  # nothing was added by the failed calls


def test_duplicate_or_negative_ids_and_missing_labels(codebooks, codes):
    built = DPQIndex(codebooks)
    built.add(codes[:3], labels=[0, 1, 2])
    with pytest.raises(ValueError, match="already in the index"):
        built.add(codes[:1], ids=[1], labels=[0])
    with pytest.raises(ValueError, match="duplicates"):
        built.add(codes[:2], ids=[7, 7], labels=[0, 0])
    with pytest.raises(ValueError, match=">= 0"):
        built.add(codes[:1], ids=[-4], labels=[0])
    with pytest.raises(ValueError, match="pass labels"):
        built.add(codes[:1])


def test_codebooks_of_another_model_are_detected(index, codebooks):
    index.check_compatible(codebooks.copy())
    with pytest.raises(ValueError, match="codebooks differ"):
        index.check_compatible(codebooks + 1e-3)
    with pytest.raises(ValueError, match=r"shape \(3, 16, 8\).*\(4, 16, 8\)"):
        index.check_compatible(codebooks[:3])


def test_bad_codebooks_are_rejected():
    with pytest.raises(ValueError, match="3-D"):
        DPQIndex(np.zeros((4, 8), np.float32))
    with pytest.raises(ValueError, match="NaN or inf"):
        DPQIndex(np.full((1, 2, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="assignment"):
        DPQIndex(np.zeros((1, 2, 3), np.float32), assignment="manhattan")


def test_index_module_does_not_import_torch():
    code = "import sys, dpq.index; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------ command line


@pytest.fixture
def cli_files(tmp_path, codebooks, rng):
    features = rng.standard_normal((120, D)).astype(np.float32)
    np.save(tmp_path / "codebooks.npy", codebooks)
    np.save(tmp_path / "features.npy", features)
    np.save(tmp_path / "labels.npy", np.arange(120) % 4)
    np.save(tmp_path / "queries.npy", features[:3] + 0.01)
    return tmp_path, features


def encode_with_codebooks(folder: Path, out: Path, *options: str) -> int:
    """``dpq encode`` of the cli_files' features.npy with their codebooks.npy into ``out``."""
    features = ["--features", str(folder / "features.npy"), *options]
    return main(
        [
            "encode",
            "--codebooks",
            str(folder / "codebooks.npy"),
            *features,
            "--out",
            str(out),
            "--quiet",
        ]
    )


def test_cli_encode_features_with_codebooks_then_search_json_and_csv(cli_files, capsys):
    tmp_path, features = cli_files
    out = tmp_path / "index.npz"
    assert encode_with_codebooks(tmp_path, out, "--labels", str(tmp_path / "labels.npy")) == 0
    assert "120 items" in capsys.readouterr().out
    built = DPQIndex.load(out)
    expected = DPQIndex(built.codebooks)
    expected.add_features(features)
    np.testing.assert_array_equal(built.codes, expected.codes)

    args = ["search", "--index", str(out), "--features", str(tmp_path / "queries.npy"), "--k", "4"]
    assert main(args + ["--num-levels", "3"]) == 0
    payload = json.loads(capsys.readouterr().out)["results"]
    dist, ids = built.search(np.load(tmp_path / "queries.npy"), 4, num_levels=3)
    assert [row["ids"] for row in payload] == ids.tolist()
    assert [row["labels"] for row in payload] == (ids % 4).tolist()
    np.testing.assert_allclose([row["distances"] for row in payload], dist, rtol=1e-6)

    assert main(args + ["--format", "csv", "--out", str(tmp_path / "top.csv")]) == 0
    lines = (tmp_path / "top.csv").read_text().splitlines()
    assert lines[0] == "query,rank,id,distance,label" and len(lines) == 1 + 3 * 4
    query, rank, item, _, label = lines[1].split(",")
    assert (query, rank) == ("0", "1") and int(label) == int(item) % 4


def test_cli_errors_exit_with_code_2_and_a_message(cli_files, capsys, codebooks):
    tmp_path, _ = cli_files
    np.save(tmp_path / "wrong_dim.npy", np.zeros((2, D + 1), np.float32))
    out = tmp_path / "index.npz"
    encode_with_codebooks(tmp_path, out)
    capsys.readouterr()
    code = main(["search", "--index", str(out), "--features", str(tmp_path / "wrong_dim.npy")])
    assert (
        code == 2 and f"dimension {D + 1} but the index expects dim {D}" in capsys.readouterr().err
    )
    code = main(["search", "--index", str(tmp_path / "nothing.npz"), "--features", str(out)])
    assert code == 2 and "nothing.npz" in capsys.readouterr().err
    code = main(
        [
            "encode",
            "--codebooks",
            str(tmp_path / "codebooks.npy"),
            "--images",
            "digits",
            "--out",
            str(out),
        ]
    )
    assert code == 2 and "--images needs --model" in capsys.readouterr().err


def test_cli_encode_and_search_images_with_a_model_checkpoint(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from PIL import Image

    from dpq.config import DPQConfig, ModelConfig, QuantizerConfig
    from dpq.model.network import DPQModel

    torch.manual_seed(0)
    config = DPQConfig(
        model=ModelConfig(backbone="small_cnn", backbone_kwargs={"width": 0.25}, num_classes=2),
        quantizer=QuantizerConfig(num_levels=2, codebook_size=16, dim=10),
    )
    model = DPQModel(config)
    checkpoint = model.save_checkpoint(tmp_path / "ckpt")
    pixels = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        folder = tmp_path / "images" / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    out = tmp_path / "index.npz"
    images = str(tmp_path / "images")
    assert (
        main(
            ["encode", "--model", str(checkpoint), "--images", images, "--out", str(out), "--quiet"]
        )
        == 0
    )
    built = DPQIndex.load(out)
    assert built.ntotal == 6 and built.metadata["classes"] == ["cat", "dog"]
    from dpq.data import load_source

    inputs, labels = load_source(images).inputs, load_source(images).labels
    reference = DPQModel.from_checkpoint(checkpoint)
    np.testing.assert_array_equal(built.codes, reference.encode(inputs))
    np.testing.assert_array_equal(built.labels, labels)
    capsys.readouterr()
    assert (
        main(
            [
                "search",
                "--index",
                str(out),
                "--model",
                str(checkpoint),
                "--images",
                images,
                "--k",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    payload = json.loads(capsys.readouterr().out)["results"]
    _, expected_ids = built.search(reference.extract_features(inputs), 1)
    assert [row["ids"] for row in payload] == expected_ids.tolist()
    other = DPQModel(config)  # fresh random codebooks
    with torch.no_grad():
        other.quantizer.codebooks.add_(1.0)
    other_checkpoint = other.save_checkpoint(tmp_path / "other")
    code = main(
        [
            "search",
            "--index",
            str(out),
            "--model",
            str(other_checkpoint),
            "--images",
            images,
            "--quiet",
        ]
    )
    assert code == 2 and "codebooks differ" in capsys.readouterr().err


def test_search_mode_is_the_default_of_search_and_is_saved(tmp_path, codebooks, codes, queries):
    plain = DPQIndex(codebooks)
    assert plain.search_mode == "aqd"
    built = DPQIndex(codebooks, search_mode="ip")
    built.add(codes)
    for levels in (1, 4):
        np.testing.assert_array_equal(
            built.search(queries, 10, num_levels=levels)[1],
            built.search(queries, 10, num_levels=levels, mode="ip")[1],
        )
    assert not np.array_equal(
        built.search(queries, 10)[1], built.search(queries, 10, mode="aqd")[1]
    )
    loaded = DPQIndex.load(built.save(tmp_path / "ip.npz"))
    assert loaded.search_mode == "ip" and "search_mode='ip'" in repr(loaded)
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], built.search(queries, 10)[1])
    # faiss interop keeps the mode (from_faiss reads 8- or 16-bit levels)
    books8 = np.random.default_rng(1).standard_normal((2, 256, D)).astype(np.float32)
    for mode, metric in (("ip", faiss.METRIC_INNER_PRODUCT), ("aqd", faiss.METRIC_L2)):
        exported = DPQIndex(books8, search_mode=mode).to_faiss()
        assert exported.metric_type == metric
        assert DPQIndex.from_faiss(exported).search_mode == mode
    with pytest.raises(ValueError, match="search_mode must be one of"):
        DPQIndex(codebooks, search_mode="cosine")


def test_an_index_file_without_a_search_mode_loads_as_aqd(tmp_path, codebooks, codes):
    """Files written before search_mode existed have no such header key."""
    built = DPQIndex(codebooks)
    built.add(codes)
    path = write_version1_file(built, tmp_path / "old.npz", drop=("search_mode",))
    loaded = DPQIndex.load(path)
    assert loaded.search_mode == "aqd" and loaded.ntotal == len(codes)


def test_adds_between_searches_wait_in_a_scanned_tail_until_it_outgrows_one_64th(
    codebooks, queries
):
    """A service adds between searches: the new items are scanned in full beside the probed
    cells (no O(N) regrouping per add), found at once, and grouped when the tail exceeds
    N/64; nprobe over all cells still equals the exhaustive scan."""
    codes = np.random.default_rng(5).integers(0, K, size=(900, L))
    part = build_in_chunks(codebooks, codes[:700], 2, chunks=1)
    part.search(queries, 5, nprobe=1)
    assert part.ungrouped == 0
    new = np.arange(700, 705)
    part.add(codes[new], ids=new)  # 5 <= 705 // 64: kept in the tail
    _, ids = part.search(reconstruct(codebooks, codes[new]), 1, nprobe=1)
    assert part.ungrouped == 5
    np.testing.assert_array_equal(ids[:, 0], new)  # found although not grouped yet
    exhaustive = part.search(queries, 25)
    np.testing.assert_array_equal(part.search(queries, 25, nprobe=K**2)[1], exhaustive[1])
    # the two nearest cells of the grouped items, and every item of the tail
    dist, found = part.search(queries, 12, nprobe=2)
    ref_d, ref_i = probe_reference(queries, codebooks, codes[:700], 12, 2, 2, L)
    tail = reconstruct(codebooks, codes[new])
    for q in range(len(queries)):
        reached = ref_i[q] >= 0
        scores = np.concatenate([ref_d[q][reached], ((queries[q] - tail) ** 2).sum(1)])
        rows = np.concatenate([ref_i[q][reached], new])
        best = rows[np.argsort(scores, kind="stable")[:12]]
        assert set(found[q][found[q] >= 0]) == set(best)
    part.add(codes[705:900], ids=np.arange(705, 900))  # 200 > 900 // 64: regrouped
    part.search(queries, 5, nprobe=1)
    assert part.ungrouped == 0
    assert_grouped(part)


@pytest.mark.parametrize("partition_levels", [0, 2])
def test_id_lookups_after_adds_in_and_out_of_id_order(codebooks, codes, partition_levels):
    """Ids after the existing ones extend the id index without sorting it again; others
    rebuild it; either way duplicates are refused and removes find their rows."""
    index = DPQIndex(codebooks, partition_levels=partition_levels)
    index.add(codes[:100], ids=10 * np.arange(100))  # 0, 10, ..., 990
    index.search(np.zeros((1, codebooks.shape[2]), np.float32), 1)  # groups the cells
    index.add(codes[100:102], ids=[2000, 1500])  # after every existing id
    index.add(codes[102:103], ids=[55])  # among them
    for taken in (1500, 990, 55):
        with pytest.raises(ValueError, match="already in the index"):
            index.add(codes[103:104], ids=[taken])
    assert index.remove([1500, 55, 10, 11]) == 3
    expected = set(10 * np.arange(100)) - {10} | {2000}
    assert set(index.ids.tolist()) == expected
    rows = {int(i): r for r, i in enumerate(index.ids)}
    np.testing.assert_array_equal(index.codes[rows[2000]], codes[100])


def test_reads_by_id_leave_the_tail_ungrouped(codebooks, codes):
    """contains, codes_of, labels_of and label_shape answer by id without regrouping, so
    a service's reads never reorder the index under concurrent searches."""
    index = DPQIndex(codebooks, partition_levels=2)
    index.add(codes[:200], ids=np.arange(200), labels=np.arange(200) % 3)
    index.group_added()
    index.add(codes[200:202], ids=[900, 901], labels=[1, 2])
    assert index.ungrouped == 2
    np.testing.assert_array_equal(
        index.contains([[900, 5], [7, 902]]), [[True, True], [True, False]]
    )
    np.testing.assert_array_equal(index.codes_of([901, 3]), codes[[201, 3]])
    np.testing.assert_array_equal(index.labels_of([900, 4, 5000]), [1, 1, -1])
    assert index.label_shape == () and DPQIndex(codebooks).label_shape is None
    with pytest.raises(ValueError, match="id 5000 is not in the index"):
        index.codes_of([3, 5000])
    assert index.ungrouped == 2
    index.group_added(only_if_large=True)  # 2 <= 202 // 64
    assert index.ungrouped == 2
    index.group_added()
    assert index.ungrouped == 0
    assert_grouped(index)
