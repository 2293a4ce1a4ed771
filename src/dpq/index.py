"""DPQIndex: coded database + Asymmetric Quantization Distance (AQD) search with lookup tables.

numpy, numba and faiss only: this module never imports torch, so a search service needs
neither torch nor a model.

Vocabulary: ``num_levels`` L, ``codebook_size`` K, ``dim`` D; codebooks are float32
(L, K, D); codes are (N, L) uint8 when K <= 256 else uint16; the reconstruction of an item
at prefix l is ``sum_{i<l} codebooks[i, codes[:, i]]``.

AQD (paper Eq. 30) of a float query q to a coded item at prefix l:
``||q||^2 - 2 sum_i <q, C_i[code_i]> + ||sum_i C_i[code_i]||^2``. Per query a lookup table
``<q, C_i>`` (l x K) is built once; each item then costs l table reads plus its stored
reconstruction norm. The norm of the full-length reconstruction is kept for every item
(4 bytes); norms of shorter prefixes are computed from the codes the first time that prefix
is searched and then cached. A one-level search needs no norm at all (it is folded into the
table).

Ties: equal distances are ordered by position in the index (insertion order), like a
stable sort of the distances.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import itertools
import json
import math
import os
import sys
import zipfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numba
import numpy as np

from dpq.atomic import atomic_writer

__all__ = ["DPQIndex", "IndexFileError", "greedy_residual_encode", "FORMAT_VERSION"]

FORMAT_NAME = "dpq-index"
FORMAT_VERSION = 1
ASSIGNMENTS = ("euclidean", "cosine")
SEARCH_MODES = ("aqd", "ip")

# Items scored per pass before their scores are compared with the heap's worst (L1-resident).
_SCAN_CHUNK = 256
# Upper bound on lookup-table memory per search batch.
_MAX_LUT_BYTES = 64 * 2**20
# Rows encoded per batch by greedy_residual_encode.
_ENCODE_BATCH = 4096
# Jobs with fewer (query, item, level) lookups than this run on the calling thread alone.
_PARALLEL_MIN_WORK = 1 << 24
# uint8 codes are stored with rows padded to whole 32-bit words: one load reads 4 codes.
_PACK_WORDS = sys.byteorder == "little"


class IndexFileError(ValueError):
    """An index file that cannot be read: truncated, tampered, or of another format version."""


# --------------------------------------------------------------------------------------------
# compiled kernels (serial, GIL-free; _run_split spreads them over threads)
# --------------------------------------------------------------------------------------------


def _jit(inline: str = "never", **options: Any):
    """numba.njit(nogil=True) with an on-disk cache when a writable cache directory exists
    (a read-only install, e.g. site-packages of another user, compiles once per process)."""

    def wrap(func):
        try:
            return numba.njit(cache=True, nogil=True, inline=inline, **options)(func)
        except RuntimeError:  # no writable cache location: compile once per process instead
            return numba.njit(nogil=True, inline=inline, **options)(func)

    return wrap


def _worker_count(work: int) -> int:
    """Threads for a job of ``work`` lookups: numba.get_num_threads() (NUMBA_NUM_THREADS,
    numba.set_num_threads) for big jobs, 1 for small ones, where starting threads costs more
    than it saves and, on a busy machine, waits for each thread to be scheduled."""
    return numba.get_num_threads() if work >= _PARALLEL_MIN_WORK else 1


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    """[(start, stop)] cutting range(total) into at most ``parts`` contiguous non-empty pieces."""
    bounds = np.linspace(0, total, max(1, min(parts, total)) + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


def _run_split(job: Callable[[int, int], None], total: int, threads: int) -> None:
    """Run ``job(start, stop)`` over pieces of range(total) on ``threads`` threads.

    With several threads the range is cut into 4 pieces per thread, taken in turn, so a
    thread that the OS schedules less (a busy machine) does not hold the others up.
    """
    pieces = _split(total, 1 if threads <= 1 else 4 * threads)
    if threads <= 1 or len(pieces) <= 1:
        for start, stop in pieces:
            job(start, stop)
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(pieces))) as pool:
        for future in [pool.submit(job, start, stop) for start, stop in pieces]:
            future.result()


@_jit()
def _sift_down(heap_d, heap_r, pos, size):
    """Restore the max-heap order on (distance, row) below ``pos``."""
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


@_jit()
def _heap_replace_top(heap_d, heap_r, d, r):
    """Replace the worst entry of a full max-heap of size k by (d, r)."""
    heap_d[0] = d
    heap_r[0] = r
    _sift_down(heap_d, heap_r, 0, heap_d.shape[0])


@_jit()
def _heap_offer(heap_d, heap_r, d, r):
    """Insert (d, r) when it ranks before the current worst entry (lexicographic order)."""
    if d < heap_d[0] or (d == heap_d[0] and r < heap_r[0]):
        _heap_replace_top(heap_d, heap_r, d, r)


@_jit()
def _heap_sort_into(heap_d, heap_r, out_d, out_r):
    """Write the heap ascending by (distance, row) into out_d / out_r; destroys the heap."""
    size = heap_d.shape[0]
    for last in range(size - 1, -1, -1):
        out_d[last] = heap_d[0]
        out_r[last] = heap_r[0]
        heap_d[0] = heap_d[last]
        heap_r[0] = heap_r[last]
        _sift_down(heap_d, heap_r, 0, last)


def _make_item_score(num_levels: int, stride: int, packed: bool):
    """Compiled ``score(codes, lut, codebook_size, row)``: sum of the row's table entries.

    packed: codes is uint32 (N * stride,) holding 4 uint8 codes per word (little-endian, so
    K <= 256); else codes is (N, >= num_levels). The table is float32
    (num_levels * codebook_size,). ``num_levels`` and ``stride`` are compile-time
    constants, so the level loop unrolls and row addressing costs no multiply.
    """
    n_words = -(-num_levels // 4)
    if packed:

        @_jit(inline="always")
        def score(codes, lut, codebook_size, row):
            base = row * stride
            c = codes[base]
            total = lut[c & 255]
            if num_levels > 1:
                total += lut[codebook_size + ((c >> 8) & 255)]
            if num_levels > 2:
                total += lut[2 * codebook_size + ((c >> 16) & 255)]
            if num_levels > 3:
                total += lut[3 * codebook_size + (c >> 24)]
            for word in range(1, n_words):
                c = codes[base + word]
                level = 4 * word
                total += lut[level * codebook_size + (c & 255)]
                if num_levels > level + 1:
                    total += lut[(level + 1) * codebook_size + ((c >> 8) & 255)]
                if num_levels > level + 2:
                    total += lut[(level + 2) * codebook_size + ((c >> 16) & 255)]
                if num_levels > level + 3:
                    total += lut[(level + 3) * codebook_size + (c >> 24)]
            return total

    else:

        @_jit(inline="always")
        def score(codes, lut, codebook_size, row):
            total = lut[codes[row, 0]]
            for level in range(1, num_levels):
                total += lut[level * codebook_size + codes[row, level]]
            return total

    return score


@functools.cache
def _scan_kernel(num_levels: int, stride: int, packed: bool):
    """Compiled top-k scan for one prefix length and storage layout (built once per process;
    numba caches the machine code on disk).

    ``scan(codes, first, stop, codebook_size, norms, luts, k, out_d, out_r)`` scores rows
    first..stop-1 by ``norms[row] + sum_l luts[q, l * K + code_l]`` (norms float32 (N,), or
    (0,) for none; luts float32 (nq, l * K)) and writes per query the k best rows ascending
    by (score, row), padded with (inf, -1), into out_d float32 (nq, k) / out_r int64 (nq, k).
    A bounded max-heap per query; scores are computed a chunk at a time and the heap is
    visited only when the chunk's best score beats the heap's worst.
    """
    score = _make_item_score(num_levels, stride, packed)

    @_jit()
    def scan(codes, first, stop, codebook_size, norms, luts, k, out_d, out_r):
        has_norm = norms.shape[0] > 0
        scores = np.empty(_SCAN_CHUNK, np.float32)
        heap_d = np.empty(k, np.float32)
        heap_r = np.empty(k, np.int64)
        for q in range(luts.shape[0]):
            lut = luts[q]
            heap_d[:] = np.inf
            heap_r[:] = -1
            threshold = heap_d[0]
            for start in range(first, stop, _SCAN_CHUNK):
                count = min(_SCAN_CHUNK, stop - start)
                # chunk views indexed from 0 let numba drop negative-index handling
                if packed:
                    chunk_codes = codes[start * stride : (start + count) * stride]
                else:
                    chunk_codes = codes[start : start + count]
                chunk_norms = norms[start : start + count] if has_norm else norms
                best = np.float32(np.inf)
                if has_norm:
                    for j in range(count):
                        d = score(chunk_codes, lut, codebook_size, j) + chunk_norms[j]
                        scores[j] = d
                        best = min(best, d)
                else:
                    for j in range(count):
                        d = score(chunk_codes, lut, codebook_size, j)
                        scores[j] = d
                        best = min(best, d)
                if best < threshold:  # rare once the heap is full: most chunks end here
                    for j in range(count):
                        # rows arrive in increasing order: an equal score never displaces
                        if scores[j] < threshold:
                            _heap_replace_top(heap_d, heap_r, scores[j], start + j)
                            threshold = heap_d[0]
            _heap_sort_into(heap_d, heap_r, out_d[q], out_r[q])

    return scan


@_jit(fastmath={"reassoc", "contract", "nsz"})
def _scaled_dots(queries, books, scale, out):
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


@_jit()
def _merge_shards(shard_d, shard_r, k):
    """Merge per-shard sorted top-k lists (S, nq, k) into one (nq, k) by (score, row)."""
    n_shards, nq, width = shard_d.shape
    out_d = np.empty((nq, k), np.float32)
    out_r = np.empty((nq, k), np.int64)
    heap_d = np.empty(k, np.float32)
    heap_r = np.empty(k, np.int64)
    for q in range(nq):
        heap_d[:] = np.inf
        heap_r[:] = -1
        for shard in range(n_shards):
            for j in range(width):
                if shard_r[shard, q, j] < 0:
                    break
                _heap_offer(heap_d, heap_r, shard_d[shard, q, j], shard_r[shard, q, j])
        _heap_sort_into(heap_d, heap_r, out_d[q], out_r[q])
    return out_d, out_r


@_jit()
def _rerank_topk(codes, num_levels, codebook_size, norms, luts, candidate_rows, out_d, out_r):
    """Re-score candidate rows (nq, S) with ``num_levels`` levels; top-k by (score, row).

    codes: (N, >= num_levels); norms: float32 (N,) or (0,) for none; luts float32
    (nq, num_levels * K); candidates equal to -1 are skipped. Writes out_d / out_r (nq, k).
    """
    nq, n_candidates = candidate_rows.shape
    k = out_d.shape[1]
    has_norm = norms.shape[0] > 0
    heap_d = np.empty(k, np.float32)
    heap_r = np.empty(k, np.int64)
    for q in range(nq):
        heap_d[:] = np.inf
        heap_r[:] = -1
        for j in range(n_candidates):
            row = candidate_rows[q, j]
            if row < 0:
                continue
            d = luts[q, codes[row, 0]]
            for level in range(1, num_levels):
                d += luts[q, level * codebook_size + codes[row, level]]
            if has_norm:
                d += norms[row]
            _heap_offer(heap_d, heap_r, d, row)
        _heap_sort_into(heap_d, heap_r, out_d[q], out_r[q])


@_jit()
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


def _compute_prefix_norms(
    codes: np.ndarray, codebooks: np.ndarray, levels: list[int]
) -> np.ndarray:
    """float32 (len(levels), N) squared reconstruction norms of codes (N, >= L) per prefix."""
    out = np.empty((len(levels), codes.shape[0]), np.float32)
    level_arr = np.asarray(sorted(levels), np.int64)

    def job(start: int, stop: int) -> None:
        _prefix_norms(codes[start:stop], codebooks, level_arr, out[:, start:stop])

    work = codes.shape[0] * codebooks.shape[2] * max(levels) // 16
    _run_split(job, codes.shape[0], _worker_count(work))
    return out


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _check_codebooks(codebooks: Any) -> np.ndarray:
    arr = np.asarray(codebooks)
    if arr.ndim != 3:
        raise ValueError(
            f"codebooks must be a 3-D array (num_levels, codebook_size, dim); got shape {arr.shape}."
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"codebooks must be floating point; got dtype {arr.dtype}.")
    num_levels, codebook_size, dim = arr.shape
    if num_levels < 1 or codebook_size < 1 or dim < 1:
        raise ValueError(f"codebooks must have no empty axis; got shape {arr.shape}.")
    if codebook_size > 65536:
        raise ValueError(
            f"codebook_size must be at most 65536 (uint16 codes); got {codebook_size}."
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("codebooks contain NaN or inf values; check the model that produced them.")
    return arr


def _code_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint8) if codebook_size <= 256 else np.dtype(np.uint16)


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ValueError(f"k must be a positive integer; got {k!r}.")
    if k <= 0:
        raise ValueError(f"k must be >= 1; got k={k}.")
    return int(k)


def _hash_codebooks(codebooks: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(codebooks, dtype="<f4").tobytes()).hexdigest()


def greedy_residual_encode(
    features: Any,
    codebooks: Any,
    assignment: Literal["euclidean", "cosine"] = "euclidean",
    num_levels: int | None = None,
) -> np.ndarray:
    """Hard-assign features to codes level by level (the shared encoding contract).

    x_1 = x; code_l = argmin_k ||x_l - C_l[k]||^2 ("euclidean") or argmax_k cos(x_l, C_l[k])
    ("cosine", the reference code's rule); x_{l+1} = x_l - C_l[code_l].

    features: float (N, D); codebooks: float32 (L, K, D). Returns codes (N, num_levels),
    uint8 when K <= 256 else uint16. Ties go to the lowest codeword index.
    """
    books = _check_codebooks(codebooks)
    total_levels, codebook_size, dim = books.shape
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {ASSIGNMENTS}; got {assignment!r}.")
    levels = total_levels if num_levels is None else int(num_levels)
    if not 1 <= levels <= total_levels:
        raise ValueError(f"num_levels must be in 1..{total_levels}; got {num_levels}.")
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(
            f"features must have shape (N, {dim}) to match the codebooks; got shape {x.shape}."
        )
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"features must be real numbers; got dtype {x.dtype}.")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise ValueError(f"features contain NaN or inf (first bad row: {bad}); clean them first.")
    codes = np.empty((x.shape[0], levels), dtype=_code_dtype(codebook_size))
    sq_norms = np.einsum("lkd,lkd->lk", books, books)
    inv_norms = 1.0 / np.maximum(np.sqrt(sq_norms), np.finfo(np.float32).tiny)
    for start in range(0, x.shape[0], _ENCODE_BATCH):
        residual = x[start : start + _ENCODE_BATCH].copy()
        for level in range(levels):
            dots = residual @ books[level].T
            if assignment == "euclidean":
                chosen = np.argmin(sq_norms[level] - 2.0 * dots, axis=1)
            else:
                chosen = np.argmax(dots * inv_norms[level], axis=1)
            codes[start : start + len(residual), level] = chosen
            residual -= books[level][chosen]
    return codes


def _array_digest(arrays: Mapping[str, np.ndarray], header_without_checksum: str) -> str:
    digest = hashlib.sha256()
    digest.update(header_without_checksum.encode())
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# the index
# --------------------------------------------------------------------------------------------


class DPQIndex:
    """A coded database searched with AQD lookup tables at any code prefix.

    Args:
        codebooks: float (L, K, D), K <= 65536; stored as float32.
        assignment: hard-assignment rule used by :meth:`add_features`: "euclidean" or "cosine".
        metadata: JSON-serialisable dict saved with the index (e.g. model name, dataset).
        search_mode: how :meth:`search` ranks when not told: "aqd" (squared Euclidean, the
            paper's Eq. 30) or "ip" (inner product; for a model whose features are class
            posteriors, see ``dpq.config.ModelConfig.feature``). Saved with the index.
    """

    def __init__(
        self,
        codebooks: Any,
        assignment: Literal["euclidean", "cosine"] = "euclidean",
        metadata: Mapping[str, Any] | None = None,
        search_mode: Literal["aqd", "ip"] = "aqd",
    ) -> None:
        self._codebooks = _check_codebooks(codebooks)
        self._codebooks.setflags(write=False)
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {ASSIGNMENTS}; got {assignment!r}.")
        if search_mode not in SEARCH_MODES:
            raise ValueError(f"search_mode must be one of {SEARCH_MODES}; got {search_mode!r}.")
        self.assignment = assignment
        self.search_mode = search_mode
        meta = dict(metadata or {})
        try:
            json.dumps(meta)
        except TypeError as exc:
            raise ValueError(f"metadata must be JSON-serialisable: {exc}") from None
        self.metadata: dict[str, Any] = meta
        num_levels, codebook_size, _ = self._codebooks.shape
        self._code_dtype = _code_dtype(codebook_size)
        # codes row-major (N, width); uint8 rows are padded to whole 32-bit words
        self._packed = _PACK_WORDS and self._code_dtype == np.uint8
        self._code_width = 4 * -(-num_levels // 4) if self._packed else num_levels
        self._codes = np.zeros((0, self._code_width), dtype=self._code_dtype)
        self._ids = np.empty(0, dtype=np.int64)
        self._labels: np.ndarray | None = None
        self._next_id = 0
        # squared norms of the reconstruction per prefix length: {num_levels: float32 (N,)}
        self._norms: dict[int, np.ndarray] = {num_levels: np.empty(0, np.float32)}
        self._sorted_id_order: np.ndarray | None = None
        self._codeword_sq_norms = np.einsum("lkd,lkd->lk", self._codebooks, self._codebooks)

    # ---- properties ------------------------------------------------------------------------

    @property
    def num_levels(self) -> int:
        """L, the number of codes per item."""
        return int(self._codebooks.shape[0])

    @property
    def codebook_size(self) -> int:
        """K, the number of codewords per level."""
        return int(self._codebooks.shape[1])

    @property
    def dim(self) -> int:
        """D, the dimension of features and queries."""
        return int(self._codebooks.shape[2])

    @property
    def ntotal(self) -> int:
        """Number of items in the index."""
        return int(self._ids.shape[0])

    def __len__(self) -> int:
        return self.ntotal

    @property
    def codebooks(self) -> np.ndarray:
        """float32 (L, K, D), read-only."""
        return self._codebooks

    @property
    def codes(self) -> np.ndarray:
        """Codes (N, L), uint8 or uint16 (a read-only view of the stored rows)."""
        view = self._codes[:, : self.num_levels]
        view.flags.writeable = False
        return view

    @property
    def ids(self) -> np.ndarray:
        """int64 (N,) item ids, in index order (read-only view)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    @property
    def labels(self) -> np.ndarray | None:
        """Item labels in index order: int64 (N,) or multi-hot uint8 (N, C); None if not given."""
        return self._labels

    @property
    def codebook_sha256(self) -> str:
        """sha256 of the float32 little-endian codebook bytes; identifies the model's codebooks."""
        return _hash_codebooks(self._codebooks)

    def bytes_per_item(self, num_levels: int | None = None) -> int:
        """Memory per item that a search at this prefix reads: the stored code row (uint8 rows
        are padded to a multiple of 4 bytes) plus a float32 norm when num_levels > 1 (a
        one-level search folds the norm into its table). Ids (8 bytes) not included."""
        levels = self._check_num_levels(num_levels)
        norm_bytes = 0 if levels == 1 else 4
        return self._code_width * self._code_dtype.itemsize + norm_bytes

    def memory_bytes(self) -> int:
        """Bytes currently held for codes, norms (all cached prefixes), ids and labels."""
        total = self._codes.nbytes + self._ids.nbytes
        total += sum(norm.nbytes for norm in self._norms.values())
        if self._labels is not None:
            total += self._labels.nbytes
        return int(total)

    def __repr__(self) -> str:
        return (
            f"DPQIndex(ntotal={self.ntotal}, num_levels={self.num_levels}, "
            f"codebook_size={self.codebook_size}, dim={self.dim}, assignment={self.assignment!r}, "
            f"search_mode={self.search_mode!r})"
        )

    # ---- adding and removing ----------------------------------------------------------------

    def _check_codes(self, codes: Any) -> np.ndarray:
        arr = np.asarray(codes)
        if arr.ndim != 2 or arr.shape[1] != self.num_levels:
            raise ValueError(
                f"codes must have shape (N, {self.num_levels}) (one code per level); "
                f"got shape {arr.shape}."
            )
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"codes must be integers; got dtype {arr.dtype}.")
        if arr.size:
            low, high = int(arr.min()), int(arr.max())
            if low < 0 or high >= self.codebook_size:
                level = int(np.flatnonzero(((arr < 0) | (arr >= self.codebook_size)).any(0))[0])
                raise ValueError(
                    f"codes out of range for codebook_size K={self.codebook_size}: expected "
                    f"values in 0..{self.codebook_size - 1}, got min {low} and max {high} "
                    f"(first bad level: {level}). Were the codes made with other codebooks?"
                )
        return arr.astype(self._code_dtype, copy=False)

    def _check_new_ids(self, ids: Any, n: int) -> np.ndarray:
        if ids is None:
            return np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        arr = np.asarray(ids)
        if arr.shape != (n,):
            raise ValueError(f"ids must have shape ({n},) (one per item); got shape {arr.shape}.")
        if n and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"ids must be integers; got dtype {arr.dtype}.")
        arr = arr.astype(np.int64)
        if n and arr.min() < 0:
            raise ValueError(f"ids must be >= 0 (-1 marks padding in results); got {arr.min()}.")
        if np.unique(arr).shape[0] != n:
            raise ValueError("ids must be unique; the given ids contain duplicates.")
        clash = np.isin(arr, self._ids)
        if clash.any():
            raise ValueError(
                f"{int(clash.sum())} id(s) are already in the index (first: {int(arr[clash][0])}); "
                "remove them first or use other ids."
            )
        return arr

    def _check_new_labels(self, labels: Any, n: int) -> np.ndarray | None:
        if labels is None:
            if self._labels is not None and self.ntotal > 0:
                raise ValueError("this index has labels: pass labels for the new items too.")
            return None
        arr = np.asarray(labels)
        if arr.ndim not in (1, 2) or arr.shape[0] != n:
            raise ValueError(
                f"labels must be (N,) class ids or (N, C) multi-hot with N={n}; got shape {arr.shape}."
            )
        if arr.ndim == 1:
            if n and not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"single labels must be integers; got dtype {arr.dtype}.")
            arr = arr.astype(np.int64)
        else:
            if arr.dtype != np.bool_ and not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"multi-hot labels must be bool or integer; got {arr.dtype}.")
            if arr.size and (arr.min() < 0 or arr.max() > 1):
                raise ValueError("multi-hot labels must hold only 0 and 1.")
            arr = arr.astype(np.uint8)
        if self.ntotal > 0:
            if self._labels is None:
                raise ValueError(
                    "this index was built without labels: cannot add labelled items to it."
                )
            if self._labels.shape[1:] != arr.shape[1:]:
                raise ValueError(
                    f"labels shape per item must be {self._labels.shape[1:]} as in the index; "
                    f"got {arr.shape[1:]}."
                )
            arr = arr.astype(self._labels.dtype)
        return arr

    def add(self, codes: Any, ids: Any = None, labels: Any = None) -> np.ndarray:
        """Append coded items.

        codes: integer (N, L) in 0..K-1; ids: int64 (N,) unique, >= 0 (default: continue
        a counter); labels: int64 (N,) or multi-hot (N, C). Returns the int64 (N,) ids.
        """
        codes_arr = self._check_codes(codes)
        n = codes_arr.shape[0]
        new_ids = self._check_new_ids(ids, n)
        new_labels = self._check_new_labels(labels, n)
        rows = np.zeros((n, self._code_width), dtype=self._code_dtype)
        rows[:, : self.num_levels] = codes_arr
        cached = sorted(self._norms)
        new_norms = _compute_prefix_norms(rows, self._codebooks, cached)
        was_empty = self.ntotal == 0
        self._codes = rows if was_empty else np.concatenate([self._codes, rows])
        self._ids = new_ids if was_empty else np.concatenate([self._ids, new_ids])
        for j, levels in enumerate(cached):
            self._norms[levels] = (
                new_norms[j] if was_empty else np.concatenate([self._norms[levels], new_norms[j]])
            )
        if was_empty or new_labels is None:  # an empty index takes the new items' labelling
            self._labels = new_labels if was_empty else self._labels
        else:
            self._labels = np.concatenate([self._labels, new_labels])
        if n:
            self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        self._sorted_id_order = None
        return new_ids

    def encode(self, features: Any, num_levels: int | None = None) -> np.ndarray:
        """Codes (N, num_levels) of float (N, D) features with this index's assignment rule."""
        return greedy_residual_encode(features, self._codebooks, self.assignment, num_levels)

    def decode(self, codes: Any) -> np.ndarray:
        """float32 (N, D) reconstructions of codes (N, l), l <= L (a prefix decodes too)."""
        arr = np.asarray(codes)
        if arr.ndim != 2 or not 1 <= arr.shape[1] <= self.num_levels:
            raise ValueError(
                f"codes must have shape (N, l) with 1 <= l <= {self.num_levels}; got {arr.shape}."
            )
        padded = np.zeros((arr.shape[0], self.num_levels), dtype=np.int64)
        padded[:, : arr.shape[1]] = arr
        self._check_codes(padded)
        out = np.zeros((arr.shape[0], self.dim), np.float32)
        for level in range(arr.shape[1]):
            out += self._codebooks[level][arr[:, level]]
        return out

    def add_features(self, features: Any, ids: Any = None, labels: Any = None) -> np.ndarray:
        """Encode float (N, D) features (greedy residual, see :func:`greedy_residual_encode`)
        and add them. Returns the int64 (N,) ids."""
        return self.add(self.encode(features), ids=ids, labels=labels)

    def _rows_of(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the given ids and a bool mask of which ids were found."""
        arr = np.asarray(ids)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(
                f"ids must be a 1-D integer array; got shape {arr.shape}, {arr.dtype}."
            )
        arr = arr.astype(np.int64)
        if self._sorted_id_order is None:
            self._sorted_id_order = np.argsort(self._ids, kind="stable")
        sorted_ids = self._ids[self._sorted_id_order]
        pos = np.searchsorted(sorted_ids, arr)
        pos_clipped = np.minimum(pos, max(len(sorted_ids) - 1, 0))
        found = (
            (pos < len(sorted_ids)) & (sorted_ids[pos_clipped] == arr)
            if len(sorted_ids)
            else (np.zeros(arr.shape, bool))
        )
        rows = np.where(found, self._sorted_id_order[pos_clipped] if len(sorted_ids) else -1, -1)
        return rows.astype(np.int64), found

    def remove(self, ids: Any) -> int:
        """Remove the items with these ids (unknown ids are ignored). Returns how many went."""
        rows, found = self._rows_of(ids)
        rows = np.unique(rows[found])
        if rows.size == 0:
            return 0
        keep = np.ones(self.ntotal, bool)
        keep[rows] = False
        self._codes = np.ascontiguousarray(self._codes[keep])
        self._ids = self._ids[keep]
        self._norms = {levels: norm[keep] for levels, norm in self._norms.items()}
        if self._labels is not None:
            self._labels = self._labels[keep]
        self._sorted_id_order = None
        return int(rows.size)

    def labels_of(self, ids: Any) -> np.ndarray:
        """Labels of items by id, any shape of ids (e.g. search results (nq, k)).

        Single labels: int64, -1 where the id is -1 or unknown. Multi-hot: (..., C), all
        zeros there. Raises ValueError if the index has no labels.
        """
        if self._labels is None:
            raise ValueError("this index has no labels; build it with labels to look them up.")
        arr = np.asarray(ids, dtype=np.int64)
        rows, found = self._rows_of(arr.ravel())
        out = self._labels[np.maximum(rows, 0)].copy() if self.ntotal else None
        if out is None:
            out = np.zeros((rows.size, *self._labels.shape[1:]), self._labels.dtype)
        if self._labels.ndim == 1:
            out[~found] = -1
        else:
            out[~found] = 0
        return out.reshape(*arr.shape, *self._labels.shape[1:])

    # ---- search -------------------------------------------------------------------------------

    def _check_num_levels(self, num_levels: Any, name: str = "num_levels") -> int:
        if num_levels is None:
            return self.num_levels
        if isinstance(num_levels, bool) or not isinstance(num_levels, int | np.integer):
            raise ValueError(
                f"{name} must be an integer in 1..{self.num_levels}; got {num_levels!r}."
            )
        if not 1 <= num_levels <= self.num_levels:
            raise ValueError(
                f"{name} must be in 1..{self.num_levels} (this index has {self.num_levels} "
                f"levels of {int(math.log2(self.codebook_size)) if self.codebook_size > 1 else 0} "
                f"bits); got {num_levels}."
            )
        return int(num_levels)

    def _check_queries(self, queries: Any) -> np.ndarray:
        arr = np.asarray(queries)
        if arr.ndim != 2:
            hint = " (use queries[None, :] for one query)" if arr.ndim == 1 else ""
            raise ValueError(
                f"queries must be a 2-D array (nq, {self.dim}); got shape {arr.shape}{hint}."
            )
        if arr.shape[1] != self.dim:
            raise ValueError(
                f"queries have dimension {arr.shape[1]} but the index expects dim {self.dim} "
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

    def _norms_for(self, num_levels: int) -> np.ndarray:
        """float32 (N,) squared reconstruction norms at this prefix (computed once, cached)."""
        if num_levels not in self._norms:
            self._norms[num_levels] = _compute_prefix_norms(
                self._codes, self._codebooks, [num_levels]
            )[0]
        return self._norms[num_levels]

    def _lookup_tables(self, queries: np.ndarray, num_levels: int, mode: str) -> np.ndarray:
        """float32 (nq, num_levels * K): per-level additive terms of the ranking score.

        "aqd": -2 <q, C_l[k]> (plus ||C_1[k]||^2 when num_levels == 1, which is then the
        whole reconstruction norm); "ip": -<q, C_l[k]>.
        """
        books = self._codebooks[:num_levels].reshape(-1, self.dim)
        luts = np.empty((len(queries), len(books)), np.float32)
        scale = np.float32(-1.0 if mode == "ip" else -2.0)

        def job(q0: int, q1: int) -> None:
            _scaled_dots(queries[q0:q1], books, scale, luts[q0:q1])

        _run_split(job, len(queries), _worker_count(luts.size * self.dim // 4))
        if mode == "aqd" and num_levels == 1:
            luts += self._codeword_sq_norms[0]
        return luts

    def _scan(
        self, luts: np.ndarray, num_levels: int, mode: str, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows (nq, k) and their scores (without ||q||^2) for tables from _lookup_tables."""
        has_norm = mode == "aqd" and num_levels > 1
        norms = self._norms_for(num_levels) if has_norm else np.empty(0, np.float32)
        nq, n = len(luts), self.ntotal
        codes = self._codes.view(np.uint32).reshape(-1) if self._packed else self._codes
        stride = self._code_width // 4 if self._packed else self._code_width
        scan = _scan_kernel(num_levels, stride, self._packed)
        threads = _worker_count(nq * n * num_levels)
        if nq >= threads:  # split the queries
            out_d = np.empty((nq, k), np.float32)
            out_r = np.empty((nq, k), np.int64)

            def by_queries(q0: int, q1: int) -> None:
                scan(
                    codes,
                    0,
                    n,
                    self.codebook_size,
                    norms,
                    luts[q0:q1],
                    k,
                    out_d[q0:q1],
                    out_r[q0:q1],
                )

            _run_split(by_queries, nq, threads)
            return out_d, out_r
        # fewer queries than threads: split the database, then merge the per-shard lists
        shards = _split(n, 4 * threads)
        shard_d = np.empty((len(shards), nq, k), np.float32)
        shard_r = np.empty((len(shards), nq, k), np.int64)

        def by_rows(s0: int, s1: int) -> None:
            for shard in range(s0, s1):
                first, stop = shards[shard]
                scan(
                    codes,
                    first,
                    stop,
                    self.codebook_size,
                    norms,
                    luts,
                    k,
                    shard_d[shard],
                    shard_r[shard],
                )

        _run_split(by_rows, len(shards), threads)
        return _merge_shards(shard_d, shard_r, k)

    def search(
        self,
        queries: Any,
        k: int,
        num_levels: int | None = None,
        mode: Literal["aqd", "ip"] | None = None,
        rerank_from: int | None = None,
        rerank_candidates: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest items per query by AQD (Eq. 30) using the first ``num_levels`` codes.

        queries: float (nq, D). mode "aqd": squared Euclidean distance from the query to each
        item's reconstruction; mode "ip": ranks by inner product with the reconstruction and
        returns its negative (so smaller is better in both modes); None: the index's
        :attr:`search_mode`. rerank_from=l0 shortlists
        ``rerank_candidates`` items (default max(10 k, 100)) with the first l0 levels, then
        re-ranks them with ``num_levels`` levels.

        Returns distances float32 (nq, k) ascending and ids int64 (nq, k); when the index has
        fewer than k items the rest is inf / -1. Ties are ordered by position in the index.
        """
        k = _check_k(k)
        levels = self._check_num_levels(num_levels)
        mode = self.search_mode if mode is None else mode
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {SEARCH_MODES}; got {mode!r}.")
        if rerank_from is not None:
            rerank_from = self._check_num_levels(rerank_from, "rerank_from")
            if rerank_from >= levels:
                raise ValueError(
                    f"rerank_from must be smaller than num_levels={levels} (it is the shorter "
                    f"prefix used for the shortlist); got {rerank_from}."
                )
        if rerank_candidates is not None:
            if rerank_from is None:
                raise ValueError("rerank_candidates needs rerank_from (the shortlist's prefix).")
            rerank_candidates = _check_k(rerank_candidates)
        q = self._check_queries(queries)
        nq = len(q)
        out_d = np.full((nq, k), np.inf, np.float32)
        out_i = np.full((nq, k), -1, np.int64)
        if nq == 0 or self.ntotal == 0:
            return out_d, out_i
        lut_bytes = levels * self.codebook_size * 4
        batch = max(1, min(nq, _MAX_LUT_BYTES // lut_bytes))
        for start in range(0, nq, batch):
            qb = q[start : start + batch]
            dist, rows = self._search_batch(qb, k, levels, mode, rerank_from, rerank_candidates)
            found = rows >= 0
            if mode == "aqd":
                dist = dist + np.einsum("qd,qd->q", qb, qb)[:, None]
                dist[~found] = np.inf
            out_d[start : start + batch] = dist
            out_i[start : start + batch] = np.where(found, self._ids[np.maximum(rows, 0)], -1)
        return out_d, out_i

    def _search_batch(
        self,
        qb: np.ndarray,
        k: int,
        levels: int,
        mode: str,
        rerank_from: int | None,
        rerank_candidates: int | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores (without ||q||^2) float32 (nq, k) and rows int64 (nq, k) of one batch."""
        luts = self._lookup_tables(qb, levels, mode)
        if rerank_from is None:
            return self._scan(luts, levels, mode, k)
        shortlist = max(k, rerank_candidates or max(10 * k, 100))
        if rerank_from == 1 and mode == "aqd":  # its table folds in the level-1 norm
            short_luts = self._lookup_tables(qb, 1, mode)
        else:
            short_luts = np.ascontiguousarray(luts[:, : rerank_from * self.codebook_size])
        _, candidates = self._scan(short_luts, rerank_from, mode, shortlist)
        # levels > rerank_from >= 1, so an "aqd" table here never holds folded norms
        norms = self._norms_for(levels) if mode == "aqd" else np.empty(0, np.float32)
        out_d = np.empty((len(qb), k), np.float32)
        out_r = np.empty((len(qb), k), np.int64)

        def rerank(q0: int, q1: int) -> None:
            _rerank_topk(
                self._codes,
                levels,
                self.codebook_size,
                norms,
                luts[q0:q1],
                candidates[q0:q1],
                out_d[q0:q1],
                out_r[q0:q1],
            )

        work = candidates.size * levels * 64  # random access: ~ a cache miss per lookup
        _run_split(rerank, len(qb), _worker_count(work))
        return out_d, out_r

    # ---- compatibility ----------------------------------------------------------------------

    def check_compatible(self, codebooks: Any, source: str = "the model") -> None:
        """Raise ValueError unless ``codebooks`` (L, K, D) equal this index's codebooks."""
        books = _check_codebooks(codebooks)
        if books.shape != self._codebooks.shape:
            raise ValueError(
                f"{source} has codebooks of shape {books.shape} but the index was built with "
                f"{self._codebooks.shape}; use the model that built the index or re-encode."
            )
        if _hash_codebooks(books) != self.codebook_sha256:
            raise ValueError(
                f"{source}'s codebooks differ from the ones this index was built with "
                f"(sha256 {_hash_codebooks(books)[:12]} vs {self.codebook_sha256[:12]}); "
                "its codes would be meaningless for these queries. Use the same model checkpoint "
                "or rebuild the index with `dpq encode`."
            )

    # ---- persistence ------------------------------------------------------------------------

    def _header(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "num_levels": self.num_levels,
            "codebook_size": self.codebook_size,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "assignment": self.assignment,
            "search_mode": self.search_mode,
            "codebook_sha256": self.codebook_sha256,
            "next_id": self._next_id,
            "has_labels": self._labels is not None,
            "metadata": self.metadata,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the index to one .npz file (no pickle), atomically. Returns the path.

        Holds codebooks, codes (N, L), ids, optional labels and a JSON header with the config,
        format version and a sha256 checksum over header and arrays. Norms are recomputed
        from the codes on load.
        """
        target = Path(path)
        arrays: dict[str, np.ndarray] = {
            "codebooks": self._codebooks,
            "codes": np.ascontiguousarray(self._codes[:, : self.num_levels]),
            "ids": self._ids,
        }
        if self._labels is not None:
            arrays["labels"] = self._labels
        header = self._header()
        header_text = json.dumps(header, sort_keys=True)
        header["checksum_sha256"] = _array_digest(arrays, header_text)
        arrays["header"] = np.array(json.dumps(header, sort_keys=True))
        with atomic_writer(target) as handle:
            np.savez(handle, **arrays)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DPQIndex:
        """Read an index written by :meth:`save`; verifies format version and checksum.

        Raises FileNotFoundError if absent, IndexFileError (a ValueError) naming the file if
        it is truncated, tampered with, or of another format version.
        """
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"index file not found: {source}")
        arrays: dict[str, np.ndarray] = {}
        try:
            with np.load(source, allow_pickle=False) as npz:
                for name in npz.files:
                    arrays[name] = npz[name]
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
            # TypeError: a single .npy array (no archive of arrays) under an .npz name
            raise IndexFileError(
                f"{source} is not a readable dpq index file (truncated, corrupted, or not an "
                f"index written by `dpq encode`?): {exc}"
            ) from None
        if "header" not in arrays:
            raise IndexFileError(f"{source} is not a dpq index file: it has no header entry.")
        try:
            header = json.loads(str(arrays.pop("header")))
        except (json.JSONDecodeError, TypeError) as exc:
            raise IndexFileError(f"{source} has an unreadable header: {exc}") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise IndexFileError(
                f"{source} is not a dpq index file (format {header.get('format')!r})."
            )
        version = header.get("format_version")
        if version != FORMAT_VERSION:
            raise IndexFileError(
                f"{source} has index format version {version!r}, but this dpq reads version "
                f"{FORMAT_VERSION}; rebuild it with `dpq encode` or use the dpq release that wrote it."
            )
        stored_checksum = header.pop("checksum_sha256", None)
        actual = _array_digest(arrays, json.dumps(header, sort_keys=True))
        if stored_checksum != actual:
            raise IndexFileError(
                f"{source} failed its checksum (stored {str(stored_checksum)[:12]}, computed "
                f"{actual[:12]}): the file was modified or damaged; rebuild it."
            )
        for name in ("codebooks", "codes", "ids"):
            if name not in arrays:
                raise IndexFileError(f"{source} lacks the {name!r} array.")
        try:
            index = cls(
                arrays["codebooks"],
                header["assignment"],
                header.get("metadata"),
                search_mode=header.get("search_mode", "aqd"),  # absent in older files
            )
            expected = (header["num_levels"], header["codebook_size"], header["dim"])
            if index._codebooks.shape != tuple(expected):
                raise ValueError(f"codebooks shape {index._codebooks.shape} != header {expected}")
            index.add(arrays["codes"], ids=arrays["ids"], labels=arrays.get("labels"))
            if index.ntotal != header["ntotal"]:
                raise ValueError(f"{index.ntotal} items but the header says {header['ntotal']}")
            index._next_id = max(index._next_id, int(header.get("next_id", 0)))
        except (ValueError, KeyError, TypeError) as exc:
            raise IndexFileError(f"{source} holds an inconsistent index: {exc}") from None
        return index

    # ---- faiss interop ----------------------------------------------------------------------

    def to_faiss(self, mode: Literal["aqd", "ip"] | None = None):
        """A faiss IndexResidualQuantizer holding these codebooks and codes (no re-encoding).

        mode "aqd": METRIC_L2 with ST_norm_float (float norm per item, lookup-table search);
        mode "ip": METRIC_INNER_PRODUCT with ST_LUT_nonorm (faiss returns +inner products);
        None: this index's :attr:`search_mode`.
        Wrapped in an IndexIDMap2 when the ids are not 0..N-1. Needs K = 2^b with b in 1..16.
        """
        import faiss

        nbits = int(round(math.log2(self.codebook_size)))
        if 2**nbits != self.codebook_size:
            raise ValueError(
                f"faiss residual quantizers need codebook_size a power of 2; got {self.codebook_size}."
            )
        mode = self.search_mode if mode is None else mode
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {SEARCH_MODES}; got {mode!r}.")
        if mode == "aqd":
            metric, search_type = faiss.METRIC_L2, faiss.AdditiveQuantizer.ST_norm_float
        else:
            metric, search_type = faiss.METRIC_INNER_PRODUCT, faiss.AdditiveQuantizer.ST_LUT_nonorm
        index = faiss.IndexResidualQuantizer(self.dim, self.num_levels, nbits, metric, search_type)
        faiss.copy_array_to_vector(self._codebooks.ravel(), index.rq.codebooks)
        index.rq.is_trained = True
        index.is_trained = True
        n = self.ntotal
        target = index
        if not np.array_equal(self._ids, np.arange(n)):  # keep the ids: wrap before adding
            target = faiss.IndexIDMap2(index)
            target.own_fields = True
            index.this.disown()  # now owned (and freed) by the wrapper
        if n:
            packed = np.zeros((n, index.code_size), dtype=np.uint8)
            codes32 = np.ascontiguousarray(self._codes[:, : self.num_levels], dtype=np.int32)
            if mode == "aqd":
                norms = np.ascontiguousarray(self._norms[self.num_levels])
                index.rq.pack_codes(
                    n, faiss.swig_ptr(codes32), faiss.swig_ptr(packed), -1, faiss.swig_ptr(norms)
                )
            else:
                index.rq.pack_codes(n, faiss.swig_ptr(codes32), faiss.swig_ptr(packed), -1)
            if target is index:
                index.add_sa_codes(packed)
            else:
                target.add_sa_codes(packed, self._ids)
        return target

    @classmethod
    def from_faiss(
        cls,
        index: Any,
        assignment: Literal["euclidean", "cosine"] = "euclidean",
        metadata: Mapping[str, Any] | None = None,
    ) -> DPQIndex:
        """Build from a faiss IndexResidualQuantizer (optionally in an IndexIDMap/IndexIDMap2)
        whose levels all have 8 or all have 16 bits: codebooks and codes are read back; an
        inner-product faiss index gives ``search_mode="ip"``."""
        import faiss

        ids = None
        base = faiss.downcast_index(index)
        if isinstance(base, faiss.IndexIDMap | faiss.IndexIDMap2):
            ids = faiss.vector_to_array(base.id_map).astype(np.int64)
            base = faiss.downcast_index(base.index)
        if not isinstance(base, faiss.IndexResidualQuantizer):
            raise ValueError(
                f"from_faiss reads an IndexResidualQuantizer (optionally in an IndexIDMap); "
                f"got {type(base).__name__}."
            )
        rq = base.rq
        nbits = faiss.vector_to_array(rq.nbits)
        if not (np.all(nbits == 8) or np.all(nbits == 16)):
            raise ValueError(
                f"from_faiss needs every level to have 8 or every level 16 bits; got {nbits.tolist()}."
            )
        if not rq.is_trained:
            raise ValueError("the faiss index is not trained: it has no codebooks yet.")
        levels, bits = int(rq.M), int(nbits[0])
        codebooks = faiss.vector_to_array(rq.codebooks).reshape(levels, 2**bits, base.d)
        mode = "ip" if base.metric_type == faiss.METRIC_INNER_PRODUCT else "aqd"
        out = cls(codebooks, assignment=assignment, metadata=metadata, search_mode=mode)
        n = int(base.ntotal)
        if n:
            raw = faiss.vector_to_array(base.codes).reshape(n, base.code_size)
            code_bytes = levels * bits // 8
            codes = raw[:, :code_bytes].copy()
            if bits == 16:
                codes = codes.view("<u2")
            out.add(codes, ids=ids)
        return out


# --------------------------------------------------------------------------------------------
# result formatting (used by `dpq search`)
# --------------------------------------------------------------------------------------------


def _label_values(labels: np.ndarray) -> list[Any]:
    """JSON-ready labels: ints for single labels, lists of positive columns for multi-hot."""
    if labels.ndim == 1:
        return [int(value) for value in labels]
    return [np.flatnonzero(row).tolist() for row in labels]


def format_search_results(
    index: DPQIndex,
    distances: np.ndarray,
    ids: np.ndarray,
    fmt: Literal["json", "csv"] = "json",
    query_ids: np.ndarray | None = None,
) -> str:
    """Text of search results (nq, k): JSON (one object per query with ids, distances and,
    when the index has labels, labels) or CSV (query,rank,id,distance[,label]); padding
    (-1) is left out. Multi-hot labels are lists of label indices ("1 5" in CSV).
    ``query_ids`` (nq,) names the queries (default 0..nq-1)."""
    if fmt not in ("json", "csv"):
        raise ValueError(f"format must be 'json' or 'csv'; got {fmt!r}.")
    names = np.arange(len(ids)) if query_ids is None else np.asarray(query_ids)
    labels = index.labels_of(ids) if index.labels is not None else None
    classes = index.metadata.get("classes")
    rows: list[dict[str, Any]] = []
    for q in range(len(ids)):
        keep = ids[q] >= 0
        row: dict[str, Any] = {
            "query": int(names[q]),
            "ids": ids[q][keep].tolist(),
            "distances": [float(f"{d:.7g}") for d in distances[q][keep]],
        }
        if labels is not None:
            row["labels"] = _label_values(labels[q][keep])
            if isinstance(classes, list):
                row["label_names"] = [
                    [str(classes[i]) for i in value]
                    if isinstance(value, list)
                    else str(classes[value])
                    for value in row["labels"]
                ]
        rows.append(row)
    if fmt == "json":
        return json.dumps({"results": rows}, indent=1) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["query", "rank", "id", "distance"] + (["label"] if labels is not None else []))
    for row in rows:
        for rank, (item, dist) in enumerate(zip(row["ids"], row["distances"], strict=True)):
            line: list[Any] = [row["query"], rank + 1, item, dist]
            if labels is not None:
                value = row["labels"][rank]
                line.append(" ".join(map(str, value)) if isinstance(value, list) else value)
            writer.writerow(line)
    return buffer.getvalue()
