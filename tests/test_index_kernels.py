"""dpq.index.kernels alone: the shared top-k list against a lexicographic sort, the scans,
shard merging and cell ranking against numpy references on tiny synthetic codes."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from dpq.index import kernels


@numba.njit
def top_k_by_push(scores, rows, k):
    heap_d, heap_r = kernels.topk_new(k)
    kernels.topk_start(heap_d, heap_r)
    for j in range(scores.shape[0]):
        kernels.topk_push(heap_d, heap_r, scores[j], rows[j])
    out_d = np.empty(k, np.float32)
    out_r = np.empty(k, np.int64)
    kernels.topk_finish(heap_d, heap_r, out_d, out_r)
    return out_d, out_r


@numba.njit
def top_k_by_chunks(scores, k, chunk, rows_in_order):
    """Chunks in row order, or (rows_in_order False) last chunk first; also whether every
    returned worst score was the list's worst."""
    heap_d, heap_r = kernels.topk_new(k)
    worst = kernels.topk_start(heap_d, heap_r)
    worst_ok = worst == np.inf
    starts = np.arange(0, scores.shape[0], chunk)
    for i in range(len(starts)):
        start = starts[i] if rows_in_order else starts[len(starts) - 1 - i]
        count = min(chunk, scores.shape[0] - start)
        chunk_scores = scores[start : start + count]
        worst = kernels.topk_push_chunk(heap_d, heap_r, chunk_scores, count, start, rows_in_order)
        worst_ok = worst_ok and worst == heap_d[0]
    out_d = np.empty(k, np.float32)
    out_r = np.empty(k, np.int64)
    kernels.topk_finish(heap_d, heap_r, out_d, out_r)
    return out_d, out_r, worst_ok


def reference_top_k(scores, rows, k):
    """Ascending by (score, row), padded with (inf, -1)."""
    order = np.lexsort((rows, scores))[:k]
    pad = k - len(order)
    return (
        np.concatenate([scores[order], np.full(pad, np.inf)]).astype(np.float32),
        np.concatenate([rows[order], np.full(pad, -1)]).astype(np.int64),
    )


@pytest.mark.parametrize("k", [1, 5, 40, 90])
def test_top_k_list_orders_by_score_then_row_and_pads(k):
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 6, size=60).astype(np.float32)  # many ties
    rows = rng.permutation(60).astype(np.int64)  # rows arrive in any order
    got_d, got_r = top_k_by_push(scores, rows, k)
    ref_d, ref_r = reference_top_k(scores, rows, k)
    np.testing.assert_array_equal(got_r, ref_r)
    np.testing.assert_array_equal(got_d, ref_d)
    ref_d, ref_r = reference_top_k(scores, np.arange(60), k)
    for rows_in_order in (True, False):
        chunk_d, chunk_r, worst_ok = top_k_by_chunks(scores, k, 7, rows_in_order)
        assert worst_ok
        np.testing.assert_array_equal(chunk_r, ref_r)
        np.testing.assert_array_equal(chunk_d, ref_d)


def tiny_store(rng, n=200, levels=3, size=8):
    codes = rng.integers(0, size, size=(n, levels)).astype(np.uint8)
    luts = rng.standard_normal((4, levels * size)).astype(np.float32)
    norms = rng.random(n).astype(np.float32)
    scores = norms[None] + sum(luts[:, lv * size + codes[:, lv]] for lv in range(levels))
    return codes, luts, norms, scores


def test_scan_kernel_matches_numpy_over_a_row_range():
    rng = np.random.default_rng(0)
    codes, luts, norms, scores = tiny_store(rng)
    scan = kernels.scan_kernel(3, 3, False)
    out_d = np.empty((4, 15), np.float32)
    out_r = np.empty((4, 15), np.int64)
    scan(codes, 20, 190, 8, norms, luts, 15, out_d, out_r)
    for q in range(4):
        rows = np.arange(20, 190)
        ref_d, ref_r = reference_top_k(scores[q, 20:190], rows, 15)
        np.testing.assert_array_equal(out_r[q], ref_r)
        np.testing.assert_allclose(out_d[q], ref_d, rtol=1e-6)


def test_merge_shards_equals_one_list_over_all_pieces():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 9, size=(3, 50)).astype(np.float32)
    pieces = [(0, 11), (11, 30), (30, 50)]
    shard_d = np.empty((3, 3, 8), np.float32)
    shard_r = np.empty((3, 3, 8), np.int64)
    for s, (a, b) in enumerate(pieces):
        for q in range(3):
            shard_d[s, q], shard_r[s, q] = reference_top_k(scores[q, a:b], np.arange(a, b), 8)
    out_d, out_r = kernels.merge_shards(shard_d, shard_r, 12)
    for q in range(3):
        ref_d, ref_r = reference_top_k(scores[q], np.arange(50), 12)
        np.testing.assert_array_equal(out_r[q], ref_r)
        np.testing.assert_array_equal(out_d[q], ref_d)


def test_rank_cells_orders_cells_by_table_distance():
    rng = np.random.default_rng(2)
    cell_codes = rng.integers(0, 8, size=(10, 2))
    luts = rng.standard_normal((3, 16)).astype(np.float32)
    cell_norms = rng.random(10).astype(np.float32)
    out = np.empty((3, 4), np.int64)
    kernels.rank_cells(luts, cell_codes, cell_norms, 8, out)
    scores = luts[:, cell_codes[:, 0]] + luts[:, 8 + cell_codes[:, 1]] + cell_norms
    for q in range(3):
        np.testing.assert_array_equal(out[q], np.lexsort((np.arange(10), scores[q]))[:4])
    padded = np.empty((3, 12), np.int64)
    kernels.rank_cells(luts, cell_codes, cell_norms, 8, padded)
    assert (padded[:, 10:] == -1).all()


def test_worker_count_is_one_for_small_jobs_and_the_limit_for_big_ones(monkeypatch):
    monkeypatch.setattr(kernels.numba, "get_num_threads", lambda: 5)
    assert kernels.worker_count(kernels.PARALLEL_MIN_WORK - 1) == 1
    assert kernels.worker_count(kernels.PARALLEL_MIN_WORK) == 5
    assert kernels.worker_count(kernels.PARALLEL_MIN_WORK, threads=2) == 2
    assert kernels.worker_count(10, threads=2) == 1


def test_a_second_process_loads_every_scan_kernel_from_the_disk_cache(tmp_path):
    """The per-configuration scans (plain, cells, lanes) are compiled by the first process
    and only loaded by the next: none is saved again, and the cache does not grow."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "kernel_load.py"  # the three first calls
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_DEBUG_CACHE": "1"}

    def run() -> str:
        done = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    first = run()
    entries = sorted(p.name for p in tmp_path.rglob("*.nbc"))
    assert any("scan_kernel" in line and "data saved" in line for line in first.splitlines())
    second = run()
    saved = [line for line in second.splitlines() if "data saved" in line and "scan" in line]
    assert not saved, saved
    for kernel in ("kernels.scan_kernel", "kernels.cell_scan_kernel", "lanes.lane_scan_kernel"):
        assert any(kernel in line and "data loaded" in line for line in second.splitlines())
    assert sorted(p.name for p in tmp_path.rglob("*.nbc")) == entries
