"""dpq.index.lanes alone: the several-queries-per-pass scan against the one-query scalar
kernel and a numpy reference (float32 sums added level by level, then the norm), bit for
bit, on tiny synthetic codes: packed words and code rows, with and without norms, ties,
padding, row ranges and batches that leave a partial lane group."""

from __future__ import annotations

import numpy as np
import pytest

from dpq.index import kernels, lanes


def reference_scan(codes_rows, luts, norms, first, stop, k):
    """Per query the k best rows first..stop-1 by (score, row), padded with (inf, -1); the
    score adds level 0 to L-1 in float32, then the norm (the kernels' order)."""
    size = luts.shape[1] // codes_rows.shape[1]
    rows = np.arange(first, stop)
    out_d = np.full((len(luts), k), np.inf, np.float32)
    out_r = np.full((len(luts), k), -1, np.int64)
    for q, lut in enumerate(luts):
        total = lut[codes_rows[rows, 0]]
        for level in range(1, codes_rows.shape[1]):
            total = total + lut[level * size + codes_rows[rows, level].astype(np.int64)]
        if len(norms):
            total = total + norms[rows]
        order = np.lexsort((rows, total))[:k]
        out_d[q, : len(order)], out_r[q, : len(order)] = total[order], rows[order]
    return out_d, out_r


def run_scan(scan, codes, first, stop, size, norms, luts, k):
    out_d = np.empty((len(luts), k), np.float32)
    out_r = np.empty((len(luts), k), np.int64)
    scan(codes, first, stop, size, norms, luts, k, out_d, out_r)
    return out_d, out_r


@pytest.mark.parametrize("nq", [1, 3, 16, 19])
def test_packed_scan_matches_scalar_kernel_and_numpy_bit_for_bit(nq):
    rng = np.random.default_rng(nq)
    n, levels, size, k = 3000, 4, 256, 37
    code_rows = rng.integers(0, size, size=(n, levels)).astype(np.uint8)
    words = code_rows.view(np.uint32).reshape(-1)  # 4 uint8 codes per word, little-endian
    norms = rng.random(n).astype(np.float32)
    luts = rng.standard_normal((nq, levels * size)).astype(np.float32)
    first, stop = 5, n - 7
    got_d = np.empty((nq, k), np.float32)
    got_r = np.empty((nq, k), np.int64)
    lanes.scan_rows(levels, 1, True, words, first, stop, size, norms, luts, k, got_d, got_r)
    ref_d, ref_r = reference_scan(code_rows, luts, norms, first, stop, k)
    np.testing.assert_array_equal(got_r, ref_r)
    np.testing.assert_array_equal(got_d, ref_d)
    scalar = kernels.scan_kernel(levels, 1, True)
    old_d, old_r = run_scan(scalar, words, first, stop, size, norms, luts, k)
    np.testing.assert_array_equal(got_r, old_r)
    np.testing.assert_array_equal(got_d, old_d)


@pytest.mark.parametrize("lane_count", lanes.LANE_WIDTHS)
def test_code_rows_with_ties_and_padding_match_numpy(lane_count):
    rng = np.random.default_rng(lane_count)
    n, levels, size = 60, 3, 300  # K > 256: uint16 code rows, 2 spare columns
    code_rows = rng.integers(0, size, size=(n, levels + 2)).astype(np.uint16)
    luts = rng.integers(-3, 4, size=(lane_count - 1, levels * size)).astype(np.float32)  # ties
    no_norms = np.empty(0, np.float32)
    scan = lanes.lane_scan_kernel(levels, levels + 2, False, lane_count, False)
    for first, stop, k in [(0, n, 25), (10, 30, 25)]:  # the second pads 5 slots per query
        got_d, got_r = run_scan(scan, code_rows, first, stop, size, no_norms, luts, k)
        ref_d, ref_r = reference_scan(code_rows[:, :levels], luts, no_norms, first, stop, k)
        np.testing.assert_array_equal(got_r, ref_r)
        np.testing.assert_array_equal(got_d, ref_d)


def test_lanes_for_takes_the_narrowest_group_that_holds_the_queries():
    assert [lanes.lanes_for(q) for q in (1, 4, 5, 8, 9, 16, 17, 100)] == [
        4,
        4,
        8,
        8,
        16,
        16,
        16,
        16,
    ]
