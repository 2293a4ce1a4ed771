"""Compiled kernels of the index: top-k scans over coded rows, lookup tables, reranking,
reconstruction norms; plus the thread splitting they run under.

Serial numba functions that release the GIL; :func:`run_split` spreads them over threads.
numpy and numba only (no torch). Every top-k result is ordered by (score, row), padded with
(inf, -1).
"""

from __future__ import annotations

import functools
import itertools
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np

# Jobs with fewer (query, item, level) lookups than this run on the calling thread alone.
PARALLEL_MIN_WORK = 1 << 24


def jit(inline: str = "never", stable_key: tuple | None = None, **options: Any):
    """numba.njit(nogil=True) with an on-disk cache when a writable cache directory exists
    (a read-only install, e.g. site-packages of another user, compiles once per process).

    ``stable_key``: for a helper built per configuration inside a factory and called from a
    kernel that closes over it. numba keys a closure's disk cache by pickling its cells, and
    a compiled function pickles with a random uuid, new in every process: the kernel would
    be compiled again by every process (seconds each) and its cache would grow by one entry
    per process. The key (the factory's arguments) gives the helper a uuid derived from it.
    """

    def wrap(func):
        try:
            compiled = numba.njit(cache=True, nogil=True, inline=inline, **options)(func)
        except RuntimeError:  # no writable cache location: compile once per process instead
            compiled = numba.njit(nogil=True, inline=inline, **options)(func)
        if stable_key is not None:
            name = f"dpq:{func.__module__}.{func.__qualname__}:{stable_key!r}"
            try:  # numba's own hook for the uuid a dispatcher pickles with
                compiled._set_uuid(str(uuid.uuid5(uuid.NAMESPACE_URL, name)))
            except (AttributeError, AssertionError):  # another numba: correct, just recompiled
                pass
        return compiled

    return wrap


def worker_count(work: int, threads: int | None = None) -> int:
    """Threads for a job of ``work`` lookups: ``threads``, or when None
    numba.get_num_threads() (NUMBA_NUM_THREADS, numba.set_num_threads), for big jobs; 1 for
    small ones, where starting threads costs more than it saves and, on a busy machine,
    waits for each thread to be scheduled."""
    if work < PARALLEL_MIN_WORK:
        return 1
    return numba.get_num_threads() if threads is None else threads


def split_range(total: int, parts: int) -> list[tuple[int, int]]:
    """[(start, stop)] cutting range(total) into at most ``parts`` contiguous non-empty pieces."""
    bounds = np.linspace(0, total, max(1, min(parts, total)) + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


def run_split(job: Callable[[int, int], None], total: int, threads: int) -> None:
    """Run ``job(start, stop)`` over pieces of range(total) on ``threads`` threads.

    With several threads the range is cut into 4 pieces per thread, taken in turn, so a
    thread that the OS schedules less (a busy machine) does not hold the others up.
    """
    if threads <= 1:  # the common case of a small search: no pieces to cut
        if total > 0:
            job(0, total)
        return
    pieces = split_range(total, 4 * threads)
    if len(pieces) <= 1:
        for start, stop in pieces:
            job(start, stop)
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(pieces))) as pool:
        for future in [pool.submit(job, start, stop) for start, stop in pieces]:
            future.result()


# ---- the top-k list every kernel keeps -------------------------------------------------------
# A max-heap of (score, row) pairs, worst on top, ordered by score then row: heap_d float32
# (k,), heap_r int64 (k,). topk_new allocates it, topk_start empties it, topk_push offers one
# pair, topk_push_chunk a chunk of consecutive rows, topk_finish writes it ascending.
# topk_start and topk_push_chunk return the worst score, which a scan keeps as its threshold:
# its hot loop only compares each score with it; the rare score below it visits the heap
# (the scans push one pair at a time: a chunk's scores kept in a buffer first cost more, the
# profile in docs/RESULTS.md "Scan profile"). The entry points are inlined into
# each kernel (no call per item); replacing the worst entry (a sift-down, on the rare scores
# that beat it) stays one out-of-line function, as LLVM decides.


@jit(inline="always")
def topk_new(k):
    """A list of k slots, to be started: (heap_d float32 (k,), heap_r int64 (k,))."""
    return np.empty(k, np.float32), np.empty(k, np.int64)


@jit(inline="always")
def topk_start(heap_d, heap_r):
    """Empty the list: every slot (inf, -1), the padding of results with fewer items.
    Returns the worst score (inf)."""
    heap_d[:] = np.inf
    heap_r[:] = -1
    return heap_d[0]


@jit()
def _sift_down(heap_d, heap_r, pos, size):
    """Restore the max-heap order on (score, row) below ``pos``."""
    d = heap_d[pos]
    r = heap_r[pos]
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        right = child + 1
        if right < size and (
            heap_d[right] > heap_d[child]
            or (heap_d[right] == heap_d[child] and heap_r[right] > heap_r[child])
        ):
            child = right
        if heap_d[child] > d or (heap_d[child] == d and heap_r[child] > r):
            heap_d[pos] = heap_d[child]
            heap_r[pos] = heap_r[child]
            pos = child
        else:
            break
    heap_d[pos] = d
    heap_r[pos] = r


@jit()
def _replace_worst(heap_d, heap_r, d, r):
    """Put (d, r) in the worst entry's place and restore the heap order."""
    heap_d[0] = d
    heap_r[0] = r
    _sift_down(heap_d, heap_r, 0, heap_d.shape[0])


@jit(inline="always")
def topk_push(heap_d, heap_r, d, r):
    """Keep (d, r) when it ranks before the current worst by (score, row)."""
    if d < heap_d[0] or (d == heap_d[0] and r < heap_r[0]):
        _replace_worst(heap_d, heap_r, d, r)


@jit(inline="always")
def topk_push_chunk(heap_d, heap_r, scores, count, first_row, rows_in_order):
    """Offer scores[0:count] (float32 (>= count,)) of rows first_row..first_row+count-1.

    rows_in_order (a constant of the calling kernel): every row already in the list comes
    before first_row (a scan in row order), so a score equal to the worst never displaces
    it; otherwise (score, row) is compared in full. Returns the new worst score."""
    worst = heap_d[0]
    for j in range(count):
        d = scores[j]
        if d < worst or (not rows_in_order and d == worst and first_row + j < heap_r[0]):
            _replace_worst(heap_d, heap_r, d, first_row + j)
            worst = heap_d[0]
    return worst


@jit(inline="always")
def topk_finish(heap_d, heap_r, out_d, out_r):
    """Write the list ascending by (score, row) into out_d float32 (k,) / out_r int64 (k,);
    leaves the heap to be started again."""
    for last in range(heap_d.shape[0] - 1, -1, -1):
        out_d[last] = heap_d[0]
        out_r[last] = heap_r[0]
        heap_d[0] = heap_d[last]
        heap_r[0] = heap_r[last]
        _sift_down(heap_d, heap_r, 0, last)


def item_score(num_levels: int, stride: int, packed: bool):
    """Compiled ``score(codes, lut, row)``: sum of the row's table entries, level 0 first.

    packed: codes is uint32 (N * stride,) holding 4 uint8 codes per word (little-endian, so
    K <= 256); else codes is (N, >= num_levels). The table is float32 (num_levels, K), one
    row per level: a level's entry is found without a multiply by K or a negative-index
    fix-up (codes are unsigned). ``num_levels`` and ``stride`` are compile-time constants,
    so the level loop unrolls and row addressing costs no multiply.
    """
    n_words = -(-num_levels // 4)
    if packed:

        @jit(inline="always", stable_key=(num_levels, stride, packed))
        def score(codes, lut, row):
            base = row * stride
            c = codes[base]
            total = lut[0, c & 255]
            if num_levels > 1:
                total += lut[1, (c >> 8) & 255]
            if num_levels > 2:
                total += lut[2, (c >> 16) & 255]
            if num_levels > 3:
                total += lut[3, c >> 24]
            for word in range(1, n_words):
                c = codes[base + word]
                level = 4 * word
                total += lut[level, c & 255]
                if num_levels > level + 1:
                    total += lut[level + 1, (c >> 8) & 255]
                if num_levels > level + 2:
                    total += lut[level + 2, (c >> 16) & 255]
                if num_levels > level + 3:
                    total += lut[level + 3, c >> 24]
            return total

    else:

        @jit(inline="always", stable_key=(num_levels, stride, packed))
        def score(codes, lut, row):
            total = lut[0, codes[row, 0]]
            for level in range(1, num_levels):
                total += lut[level, codes[row, level]]
            return total

    return score


@jit(inline="always")
def level_tables(luts, q, num_levels, codebook_size):
    """Query q's table of luts float32 (nq, num_levels * K) as float32 (num_levels, K)."""
    return luts[q].reshape((num_levels, codebook_size))


@functools.cache
def scan_kernel(num_levels: int, stride: int, packed: bool):
    """Compiled top-k scan for one prefix length and storage layout, one query at a time
    (built once per process; numba caches the machine code on disk).

    ``scan(codes, first, stop, codebook_size, norms, luts, k, out_d, out_r)`` scores rows
    first..stop-1 by ``norms[row] + sum_l luts[q, l * K + code_l]`` (norms float32 (N,), or
    (0,) for none; luts float32 (nq, l * K)) and writes per query the k best rows ascending
    by (score, row), padded with (inf, -1), into out_d float32 (nq, k) / out_r int64 (nq, k).
    A bounded max-heap per query; each score is compared with the heap's worst, and only the
    rare score below it (rows arrive in increasing order) visits the heap.
    """
    score = item_score(num_levels, stride, packed)

    @jit()
    def scan(codes, first, stop, codebook_size, norms, luts, k, out_d, out_r):
        has_norm = norms.shape[0] > 0
        heap_d, heap_r = topk_new(k)
        # views indexed from 0 let numba drop negative-index handling
        if packed:
            rows_codes = codes[first * stride : stop * stride]
        else:
            rows_codes = codes[first:stop]
        rows_norms = norms[first:stop] if has_norm else norms
        for q in range(luts.shape[0]):
            lut = level_tables(luts, q, num_levels, codebook_size)
            worst = topk_start(heap_d, heap_r)
            if has_norm:
                for t in range(stop - first):
                    d = score(rows_codes, lut, t) + rows_norms[t]
                    if d < worst:
                        _replace_worst(heap_d, heap_r, d, first + t)
                        worst = heap_d[0]
            else:
                for t in range(stop - first):
                    d = score(rows_codes, lut, t)
                    if d < worst:
                        _replace_worst(heap_d, heap_r, d, first + t)
                        worst = heap_d[0]
            topk_finish(heap_d, heap_r, out_d[q], out_r[q])

    return scan


def _make_partial_score(num_levels: int, first_level: int, stride: int, packed: bool):
    """Compiled ``score(codes, lut, row, total)``: ``total`` plus the row's table entries
    of levels first_level..num_levels-1, added left to right (so a prefix sum passed in as
    ``total`` gives bit for bit the sum :func:`item_score` computes). Layouts and table as
    in :func:`item_score`; the level bounds are compile-time constants."""
    if packed:

        @jit(inline="always", stable_key=(num_levels, first_level, stride, packed))
        def score(codes, lut, row, total):
            base = row * stride
            for level in range(first_level, num_levels):
                word = codes[base + (level >> 2)]
                total += lut[level, (word >> ((level & 3) * 8)) & 255]
            return total

    else:

        @jit(inline="always", stable_key=(num_levels, first_level, stride, packed))
        def score(codes, lut, row, total):
            for level in range(first_level, num_levels):
                total += lut[level, codes[row, level]]
            return total

    return score


@functools.cache
def cell_scan_kernel(num_levels: int, cell_levels: int, stride: int, packed: bool):
    """Compiled top-k scan over chosen cells of an index whose rows are grouped by their
    first ``cell_levels`` codes (built once per process; numba caches it on disk).

    ``scan(codes, starts, stops, cells, codebook_size, norms, luts, k, out_d, out_r)``:
    cells int64 (nq, P) are per query indices into starts / stops int64 (C,) (the row range
    of each cell), -1 ending the list. Every row of a cell shares its first ``cell_levels``
    codes, so their table sum is computed once per cell and the rows add the remaining
    levels, giving bit for bit the scores of :func:`scan_kernel` (same additions, same
    order). Writes per query the k best rows by (score, row), padded with (inf, -1), into
    out_d float32 (nq, k) / out_r int64 (nq, k); the result does not depend on the order
    of the cells.
    """
    prefix = _make_partial_score(cell_levels, 0, stride, packed)
    rest = _make_partial_score(num_levels, cell_levels, stride, packed)

    @jit()
    def scan(codes, starts, stops, cells, codebook_size, norms, luts, k, out_d, out_r):
        has_norm = norms.shape[0] > 0
        heap_d, heap_r = topk_new(k)
        zero = np.float32(0.0)
        for q in range(luts.shape[0]):
            lut = level_tables(luts, q, num_levels, codebook_size)
            worst = topk_start(heap_d, heap_r)
            for j in range(cells.shape[1]):
                cell = cells[q, j]
                if cell < 0:
                    break
                first = starts[cell]
                stop = stops[cell]
                if first >= stop:
                    continue
                base = prefix(codes, lut, first, zero)
                # views indexed from 0 let numba drop negative-index handling
                if packed:
                    cell_codes = codes[first * stride : stop * stride]
                else:
                    cell_codes = codes[first:stop]
                # cells come in any order: a score equal to the worst may displace it
                if has_norm:
                    cell_norms = norms[first:stop]
                    for t in range(stop - first):
                        d = rest(cell_codes, lut, t, base) + cell_norms[t]
                        if d <= worst:
                            topk_push(heap_d, heap_r, d, first + t)
                            worst = heap_d[0]
                else:
                    for t in range(stop - first):
                        d = rest(cell_codes, lut, t, base)
                        if d <= worst:
                            topk_push(heap_d, heap_r, d, first + t)
                            worst = heap_d[0]
            topk_finish(heap_d, heap_r, out_d[q], out_r[q])

    return scan


@jit()
def rank_cells(luts, cell_codes, cell_norms, codebook_size, out_cells):
    """Per query the cells nearest in lookup-table distance, best first.

    luts float32 (nq, >= l * K); cell_codes (C, l) the first l codes shared by each cell;
    cell_norms float32 (C,) squared norms of the cells' prefix reconstructions, or (0,) when
    the score has none (inner product, or a one-level "aqd" table that folds it in). Writes
    out_cells int64 (nq, P): indices into cell_codes of the P lowest
    ``sum_i luts[q, i * K + cell_codes[c, i]] (+ cell_norms[c])``, ascending by (score,
    index), -1 padded when C < P.
    """
    nprobe = out_cells.shape[1]
    n_cells, levels = cell_codes.shape
    has_norm = cell_norms.shape[0] > 0
    heap_d, heap_r = topk_new(nprobe)
    sorted_d = np.empty(nprobe, np.float32)
    for q in range(luts.shape[0]):
        lut = luts[q]
        topk_start(heap_d, heap_r)
        for c in range(n_cells):
            s = lut[cell_codes[c, 0]]
            for level in range(1, levels):
                s += lut[level * codebook_size + cell_codes[c, level]]
            if has_norm:
                s += cell_norms[c]
            if s < heap_d[0]:  # cells arrive in increasing index: equal scores keep the first
                topk_push(heap_d, heap_r, s, c)
        topk_finish(heap_d, heap_r, sorted_d, out_cells[q])


@jit(fastmath={"reassoc", "contract", "nsz"})
def scaled_dots(queries, books, scale, out):
    """out float32 (nq, M) = scale * queries (nq, D) @ books (M, D).T, four queries per pass.

    Compiled here rather than left to BLAS: on a busy machine a multi-threaded BLAS call
    for these small products can wait tens of milliseconds for its threads.
    """
    nq, dim = queries.shape
    q = 0
    while q + 4 <= nq:
        x0 = queries[q]
        x1 = queries[q + 1]
        x2 = queries[q + 2]
        x3 = queries[q + 3]
        for m in range(books.shape[0]):
            b = books[m]
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for t in range(dim):
                bt = b[t]
                a0 += x0[t] * bt
                a1 += x1[t] * bt
                a2 += x2[t] * bt
                a3 += x3[t] * bt
            out[q, m] = scale * a0
            out[q + 1, m] = scale * a1
            out[q + 2, m] = scale * a2
            out[q + 3, m] = scale * a3
        q += 4
    for rest in range(q, nq):
        x = queries[rest]
        for m in range(books.shape[0]):
            b = books[m]
            acc = np.float32(0.0)
            for t in range(dim):
                acc += x[t] * b[t]
            out[rest, m] = scale * acc


@jit()
def merge_shards(shard_d, shard_r, k):
    """Merge per-shard sorted top-k lists (S, nq, k) into one (nq, k) by (score, row)."""
    n_shards, nq, width = shard_d.shape
    out_d = np.empty((nq, k), np.float32)
    out_r = np.empty((nq, k), np.int64)
    heap_d, heap_r = topk_new(k)
    for q in range(nq):
        topk_start(heap_d, heap_r)
        for shard in range(n_shards):
            for j in range(width):
                if shard_r[shard, q, j] < 0:
                    break
                topk_push(heap_d, heap_r, shard_d[shard, q, j], shard_r[shard, q, j])
        topk_finish(heap_d, heap_r, out_d[q], out_r[q])
    return out_d, out_r


@jit()
def rerank_topk(codes, num_levels, codebook_size, norms, luts, candidate_rows, out_d, out_r):
    """Re-score candidate rows (nq, S) with ``num_levels`` levels; top-k by (score, row).

    codes: (N, >= num_levels); norms: float32 (N,) or (0,) for none; luts float32
    (nq, num_levels * K); candidates equal to -1 are skipped. Writes out_d / out_r (nq, k).
    """
    nq, n_candidates = candidate_rows.shape
    k = out_d.shape[1]
    has_norm = norms.shape[0] > 0
    heap_d, heap_r = topk_new(k)
    for q in range(nq):
        topk_start(heap_d, heap_r)
        for j in range(n_candidates):
            row = candidate_rows[q, j]
            if row < 0:
                continue
            d = luts[q, codes[row, 0]]
            for level in range(1, num_levels):
                d += luts[q, level * codebook_size + codes[row, level]]
            if has_norm:
                d += norms[row]
            topk_push(heap_d, heap_r, d, row)
        topk_finish(heap_d, heap_r, out_d[q], out_r[q])


@jit()
def _prefix_norms(codes, codebooks, levels, out):
    """Squared norms of prefix reconstructions into out float32 (len(levels), N).

    codes: (N, >= L) uint8/uint16; codebooks float32 (L, K, D); levels: int64 ascending.
    Row j gets ``||sum_{i < levels[j]} codebooks[i, codes[:, i]]||^2`` (summed in float64).
    """
    deepest = levels[-1]
    dim = codebooks.shape[2]
    acc = np.empty(dim, np.float32)
    for row in range(codes.shape[0]):
        acc[:] = 0.0
        j = 0
        for level in range(deepest):
            codeword = codebooks[level, codes[row, level]]
            for t in range(dim):
                acc[t] += codeword[t]
            if level + 1 == levels[j]:
                total = 0.0
                for t in range(dim):
                    total += np.float64(acc[t]) * np.float64(acc[t])
                out[j, row] = total
                j += 1


def compute_prefix_norms(codes: np.ndarray, codebooks: np.ndarray, levels: list[int]) -> np.ndarray:
    """float32 (len(levels), N) squared reconstruction norms of codes (N, >= L) per prefix."""
    out = np.empty((len(levels), codes.shape[0]), np.float32)
    level_arr = np.asarray(sorted(levels), np.int64)

    def job(start: int, stop: int) -> None:
        _prefix_norms(codes[start:stop], codebooks, level_arr, out[:, start:stop])

    work = codes.shape[0] * codebooks.shape[2] * max(levels) // 16
    run_split(job, codes.shape[0], worker_count(work))
    return out
