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

Partitioned index (``partition_levels`` p = 1 or 2): the first p codes of an item name its
cell (K or K^2 cells, trained with the model: the later levels encode the residual inside
the cell). Items are kept grouped by cell (an offsets array, rows contiguous per cell), and
``search(..., nprobe=n)`` ranks the cells by the query's lookup-table distance to each
cell's prefix reconstruction and scans only the n best. Adding appends in amortised O(items
added); the new items join their cells in one O(N) pass at the next read (search, save,
``codes``...). Index order is then cell by cell, insertion order within a cell.

Results: ``search(queries, k)`` returns min(k, ntotal) columns; where fewer items are
reachable (e.g. with nprobe) the rest is (inf, -1). Ties: equal distances are ordered by
position in the index, like a stable sort of the distances.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dpq.index import cells as cell_math
from dpq.index import kernels
from dpq.index.rows import Rows
from dpq.index.storage import FORMAT_VERSION, IndexFileError, read_index_file, write_index_file

__all__ = ["DPQIndex", "IndexFileError", "greedy_residual_encode", "FORMAT_VERSION", "MAX_K"]

ASSIGNMENTS = ("euclidean", "cosine")
SEARCH_MODES = ("aqd", "ip")
# Largest k accepted by search. k above ntotal is cut to ntotal (the result has
# min(k, ntotal) columns), so this bound only turns typos and overflowing values into errors.
MAX_K = 2**31 - 1

# Upper bound on lookup-table memory per search batch.
_MAX_LUT_BYTES = 64 * 2**20
# A search leaves items added since the last grouping in a tail (scanned in full beside the
# probed cells) while the tail holds at most N / _TAIL_FRACTION items: a service that adds
# between searches then pays O(tail) per search, not an O(N) regrouping per add.
_TAIL_FRACTION = 64
# Rows encoded per batch by greedy_residual_encode.
_ENCODE_BATCH = 4096
# uint8 codes are stored with rows padded to whole 32-bit words: one load reads 4 codes.
_PACK_WORDS = sys.byteorder == "little"


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


def _check_k(k: Any, name: str = "k") -> int:
    """k as an int in 1..MAX_K, else a ValueError naming the problem."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ValueError(f"{name} must be a positive integer; got {k!r}.")
    if k <= 0:
        raise ValueError(f"{name} must be >= 1; got {name}={k}.")
    if k > MAX_K:
        raise ValueError(
            f"{name}={k} is beyond the largest accepted value {MAX_K}; results have at most "
            f"ntotal columns anyway, so pass at most the number of items you want."
        )
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
        partition_levels: 0 (one cell: every search scans all items), 1 (K cells, by the
            first code) or 2 (K^2 cells, by the first two codes); enables
            ``search(..., nprobe=n)``. Saved with the index; see :meth:`repartition`.
    """

    def __init__(
        self,
        codebooks: Any,
        assignment: Literal["euclidean", "cosine"] = "euclidean",
        metadata: Mapping[str, Any] | None = None,
        search_mode: Literal["aqd", "ip"] = "aqd",
        partition_levels: int = 0,
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
        self._rows = Rows()
        self._has_labels = False
        self._read_only: str | None = None  # why add/remove are refused (a mapped file)
        self._next_id = 0
        self._sorted_id_order: np.ndarray | None = None
        self._codeword_sq_norms = np.einsum("lkd,lkd->lk", self._codebooks, self._codebooks)
        self._partition_levels = self._check_partition_levels(partition_levels)
        # rows [0, _grouped) are grouped by cell as _offsets says; later rows wait (a tail)
        self._offsets = np.zeros(self._n_cells() + 1, np.int64)
        self._grouped = 0
        self._cell_tables: dict[int, tuple[np.ndarray, ...]] = {}
        # searches may run on several threads (the kernels release the GIL): the lazy steps
        # they share (grouping, cached norms and cell tables) run one at a time
        self._lazy_lock = threading.RLock()

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
        return int(self._rows.size)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def codebooks(self) -> np.ndarray:
        """float32 (L, K, D), read-only."""
        return self._codebooks

    @property
    def codes(self) -> np.ndarray:
        """Codes (N, L), uint8 or uint16 (a read-only view of the stored rows, index order)."""
        self._group()
        view = self._codes[:, : self.num_levels]
        view.flags.writeable = False
        return view

    @property
    def ids(self) -> np.ndarray:
        """int64 (N,) item ids, in index order (read-only view)."""
        self._group()
        view = self._ids.view()
        view.flags.writeable = False
        return view

    @property
    def labels(self) -> np.ndarray | None:
        """Item labels in index order: int64 (N,) or multi-hot uint8 (N, C); None if not given."""
        self._group()
        return self._labels

    @property
    def codebook_sha256(self) -> str:
        """sha256 of the float32 little-endian codebook bytes; identifies the model's codebooks."""
        return _hash_codebooks(self._codebooks)

    @property
    def partition_levels(self) -> int:
        """p: items are grouped into K^p cells by their first p codes (0: one cell)."""
        return self._partition_levels

    @property
    def cell_offsets(self) -> np.ndarray:
        """int64 (K^p + 1,): cell c (its first p codes, first most significant) holds the
        items at positions offsets[c]:offsets[c + 1] of the index order (read-only)."""
        self._group()
        view = self._offsets.view()
        view.flags.writeable = False
        return view

    @property
    def read_only(self) -> bool:
        """True for an index memory-mapped from a file (``load(..., mmap=True)``)."""
        return self._read_only is not None

    @property
    def next_id(self) -> int:
        """The id :meth:`add` gives the next item when no ids are passed."""
        return self._next_id

    def bytes_per_item(self, num_levels: int | None = None) -> int:
        """Memory per item that a search at this prefix reads: the stored code row (uint8 rows
        are padded to a multiple of 4 bytes) plus a float32 norm when num_levels > 1 (a
        one-level search folds the norm into its table). Ids (8 bytes) not included."""
        levels = self._check_num_levels(num_levels)
        norm_bytes = 0 if levels == 1 else 4
        return self._code_width * self._code_dtype.itemsize + norm_bytes

    def memory_bytes(self) -> int:
        """Bytes of codes, norms (all cached prefixes), ids, labels and cell offsets
        (arrays memory-mapped from a file count with their full size)."""
        return int(self._rows.nbytes() + self._offsets.nbytes)

    def __repr__(self) -> str:
        return (
            f"DPQIndex(ntotal={self.ntotal}, num_levels={self.num_levels}, "
            f"codebook_size={self.codebook_size}, dim={self.dim}, assignment={self.assignment!r}, "
            f"search_mode={self.search_mode!r}, partition_levels={self.partition_levels})"
        )

    # ---- raw storage (unordered while a tail waits; see _group) -------------------------------

    @property
    def _codes(self) -> np.ndarray:
        return self._rows.get("codes") if "codes" in self._rows else self._empty_codes()

    @property
    def _ids(self) -> np.ndarray:
        return self._rows.get("ids") if "ids" in self._rows else np.empty(0, np.int64)

    @property
    def _labels(self) -> np.ndarray | None:
        return self._rows.get("labels") if "labels" in self._rows else None

    def _empty_codes(self) -> np.ndarray:
        return np.zeros((0, self._code_width), dtype=self._code_dtype)

    def _norm_column(self, num_levels: int) -> str:
        return f"norms:{num_levels}"

    def _check_writable(self) -> None:
        if self._read_only is not None:
            raise ValueError(
                f"this index is memory-mapped from {self._read_only} and read-only; load it "
                "without mmap=True to change it, or use dpq.index.append_to_index_file."
            )

    # ---- cells --------------------------------------------------------------------------------

    def _check_partition_levels(self, partition_levels: Any) -> int:
        if isinstance(partition_levels, bool) or not isinstance(partition_levels, int | np.integer):
            raise ValueError(f"partition_levels must be 0, 1 or 2; got {partition_levels!r}.")
        p = int(partition_levels)
        if p not in cell_math.PARTITION_LEVELS or p > self.num_levels:
            raise ValueError(
                f"partition_levels must be one of {cell_math.PARTITION_LEVELS} and at most "
                f"num_levels={self.num_levels}; got {partition_levels}."
            )
        if cell_math.cell_count(self.codebook_size, p) > cell_math.MAX_CELLS:
            raise ValueError(
                f"partition_levels={p} with codebook_size {self.codebook_size} makes "
                f"{self.codebook_size}^{p} cells, more than {cell_math.MAX_CELLS}; use "
                "partition_levels=1."
            )
        return p

    def _n_cells(self) -> int:
        return cell_math.cell_count(self.codebook_size, self._partition_levels)

    def _layout_changed(self) -> None:
        self._sorted_id_order = None
        self._cell_tables = {}

    @property
    def ungrouped(self) -> int:
        """Items added since the cells were last regrouped (a partitioned index's tail, which
        a search with nprobe scans in full); 0 for an unpartitioned index."""
        return self.ntotal - self._grouped

    def group_added(self, only_if_large: bool = False) -> None:
        """Merge the items added since the last grouping into their cells (one O(N) pass;
        every read that needs index order does it too). ``only_if_large``: only when they
        have outgrown what a search scans beside the probed cells (N/64), as a search does.

        Reads never change the index otherwise, so a program that searches from several
        threads while another adds calls this after each write, under its write lock."""
        if not only_if_large or self.ntotal - self._grouped > self.ntotal // _TAIL_FRACTION:
            self._group()

    def _group(self) -> None:
        """Merge the items added since the last read into their cells (one O(N) pass)."""
        if self._grouped == self.ntotal:
            return
        with self._lazy_lock:
            self._group_locked()

    def _group_locked(self) -> None:
        n = self.ntotal
        if self._grouped == n:
            return
        if self._partition_levels == 0:
            self._offsets = np.array([0, n], np.int64)
            self._grouped = n
            return
        g = self._grouped
        tail_cells = cell_math.cells_of(self._codes[g:], self._partition_levels, self.codebook_size)
        tail_order, tail_offsets = cell_math.group_order(tail_cells, self._n_cells())
        sources = [self._offsets, tail_offsets]
        kept, moved = cell_math.interleave_positions(sources, 0, self._n_cells())
        order = np.empty(n, np.int64)
        order[kept] = np.arange(g)
        order[moved] = g + tail_order
        self._rows.take(order)
        self._offsets = cell_math.merged_offsets(sources)
        self._grouped = n
        self._layout_changed()

    def repartition(self, partition_levels: int) -> None:
        """Regroup all items by their first ``partition_levels`` codes (0, 1 or 2)."""
        self._check_writable()
        self._partition_levels = self._check_partition_levels(partition_levels)
        self._offsets = np.zeros(self._n_cells() + 1, np.int64)
        self._grouped = 0
        self._layout_changed()
        self._group()

    def _cell_table(self, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Non-empty cells of the first ``levels`` <= p codes: row starts, row stops (int64
        (C,)), their codes int64 (C, levels) and prefix-reconstruction squared norms float32
        (C,). Cached until the items change."""
        with self._lazy_lock:
            if levels not in self._cell_tables:
                self._cell_tables[levels] = self._make_cell_table(levels)
            return self._cell_tables[levels]

    def _make_cell_table(self, levels: int) -> tuple[np.ndarray, ...]:
        offsets = cell_math.coarser_offsets(
            self._offsets, self.codebook_size, self._partition_levels, levels
        )
        cells = np.flatnonzero(np.diff(offsets))
        codes = cell_math.cell_codes(cells, levels, self.codebook_size)
        norms = kernels.compute_prefix_norms(codes, self._codebooks, [levels])[0]
        return offsets[cells], offsets[cells + 1], codes, norms

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
        found = self._rows_of(arr)[1] if self.ntotal else np.zeros(n, bool)
        if found.any():
            raise ValueError(
                f"{int(found.sum())} id(s) are already in the index (first: {int(arr[found][0])}); "
                "remove them first or use other ids."
            )
        return arr

    def _check_new_labels(self, labels: Any, n: int) -> np.ndarray | None:
        if labels is None:
            if self._has_labels and self.ntotal > 0:
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
            if not self._has_labels:
                raise ValueError(
                    "this index was built without labels: cannot add labelled items to it."
                )
            stored = self._labels
            if stored.shape[1:] != arr.shape[1:]:
                raise ValueError(
                    f"labels shape per item must be {stored.shape[1:]} as in the index; "
                    f"got {arr.shape[1:]}."
                )
            arr = arr.astype(stored.dtype)
        return arr

    def reserve(self, ntotal: int) -> None:
        """Make room for ``ntotal`` items so adds up to that size never copy the arrays
        (optional: without it capacity grows by 1.5x when needed)."""
        self._check_writable()
        self._rows.reserve(int(ntotal))

    def add(self, codes: Any, ids: Any = None, labels: Any = None) -> np.ndarray:
        """Append coded items; amortised O(items added), memory grows geometrically.

        codes: integer (N, L) in 0..K-1; ids: int64 (N,) unique, >= 0 (default: continue
        a counter); labels: int64 (N,) or multi-hot (N, C). Returns the int64 (N,) ids.
        In a partitioned index the items join their cells at the next read.
        """
        self._check_writable()
        codes_arr = self._check_codes(codes)
        n = codes_arr.shape[0]
        new_ids = self._check_new_ids(ids, n)
        new_labels = self._check_new_labels(labels, n)
        if self.ntotal == 0:  # an empty index takes the new items' labelling
            self._rows.clear()
            self._has_labels = new_labels is not None
            self._grouped = 0
            self._offsets = np.zeros(self._n_cells() + 1, np.int64)
        rows = np.zeros((n, self._code_width), dtype=self._code_dtype)
        rows[:, : self.num_levels] = codes_arr
        cached = sorted(
            {self.num_levels}
            | {int(name.split(":")[1]) for name in self._rows.names() if name.startswith("norms:")}
        )
        new_norms = kernels.compute_prefix_norms(rows, self._codebooks, cached)
        appended = {"codes": rows, "ids": new_ids}
        appended.update({self._norm_column(lv): new_norms[j] for j, lv in enumerate(cached)})
        if new_labels is not None:
            appended["labels"] = new_labels
        previous_order, previous_n = self._sorted_id_order, self.ntotal
        self._rows.append(appended)
        if n:
            self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        if self._partition_levels == 0:
            self._group()
            self._layout_changed()
        elif self._grouped == 0:
            self._layout_changed()
        # else: the grouped rows and their cells stand; the new rows wait in the tail
        self._sorted_id_order = self._extended_id_order(previous_order, previous_n, new_ids)
        return new_ids

    def _extended_id_order(
        self, previous: np.ndarray | None, previous_n: int, new_ids: np.ndarray
    ) -> np.ndarray | None:
        """The id-sorted row order after appending ``new_ids`` at rows previous_n.., without
        sorting again when they all come after the existing ids (a counter, as a service
        adds); None (rebuilt at the next lookup) otherwise."""
        if previous is None or len(previous) != previous_n:
            return None
        if previous_n and len(new_ids) and new_ids.min() <= self._ids[previous[-1]]:
            return None
        return np.concatenate([previous, previous_n + np.argsort(new_ids, kind="stable")])

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
        """Rows (positions in the current storage order) of the given ids and a bool mask of
        which ids were found."""
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
        """Remove the items with these ids (unknown ids are ignored). Returns how many went.
        The other items keep their order (and cells)."""
        self._check_writable()
        self._group()
        rows, found = self._rows_of(ids)
        rows = np.unique(rows[found])
        if rows.size == 0:
            return 0
        keep = np.ones(self.ntotal, bool)
        keep[rows] = False
        cells = np.searchsorted(self._offsets, rows, side="right") - 1
        removed = np.bincount(cells, minlength=self._n_cells())
        self._rows.take(keep)
        self._offsets = self._offsets - cell_math.offsets_from_counts(removed)
        self._grouped = self.ntotal
        self._layout_changed()
        return int(rows.size)

    def contains(self, ids: Any) -> np.ndarray:
        """bool array of the shape of ``ids``: which ids are in the index."""
        arr = np.asarray(ids, dtype=np.int64)
        return self._rows_of(arr.ravel())[1].reshape(arr.shape)

    def codes_of(self, ids: Any) -> np.ndarray:
        """Codes (n, L) of the items with these n ids, in that order; ValueError naming the
        first id that is not in the index."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        rows, found = self._rows_of(arr)
        if not found.all():
            raise ValueError(f"id {int(arr[~found][0])} is not in the index.")
        return self._codes[rows, : self.num_levels].copy()

    @property
    def label_shape(self) -> tuple[int, ...] | None:
        """Shape of one item's label: () for class ids, (C,) for multi-hot; None without."""
        labels = self._labels
        return None if labels is None else tuple(labels.shape[1:])

    def labels_of(self, ids: Any) -> np.ndarray:
        """Labels of items by id, any shape of ids (e.g. search results (nq, k)).

        Single labels: int64, -1 where the id is -1 or unknown. Multi-hot: (..., C), all
        zeros there. Raises ValueError if the index has no labels.
        """
        if not self._has_labels:
            raise ValueError("this index has no labels; build it with labels to look them up.")
        stored = self._labels  # rows in storage order, as _rows_of gives them: no grouping
        arr = np.asarray(ids, dtype=np.int64)
        rows, found = self._rows_of(arr.ravel())
        if self.ntotal:
            out = stored[np.maximum(rows, 0)].copy()
        else:
            out = np.zeros((rows.size, *stored.shape[1:]), stored.dtype)
        if stored.ndim == 1:
            out[~found] = -1
        else:
            out[~found] = 0
        return out.reshape(*arr.shape, *stored.shape[1:])

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

    def _check_nprobe(self, nprobe: Any) -> int | None:
        if nprobe is None:
            return None
        if self._partition_levels == 0:
            raise ValueError(
                "nprobe needs a partitioned index, but this one has partition_levels=0; build "
                "it with DPQIndex(..., partition_levels=1 or 2) or call index.repartition(1), "
                "or leave nprobe out to scan every item."
            )
        return _check_k(nprobe, "nprobe")

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
        name = self._norm_column(num_levels)
        with self._lazy_lock:
            if name not in self._rows:
                norms = kernels.compute_prefix_norms(self._codes, self._codebooks, [num_levels])
                self._rows.set_column(name, norms[0])
            return self._rows.get(name)

    def _lookup_tables(self, queries: np.ndarray, num_levels: int, mode: str) -> np.ndarray:
        """float32 (nq, num_levels * K): per-level additive terms of the ranking score.

        "aqd": -2 <q, C_l[k]> (plus ||C_1[k]||^2 when num_levels == 1, which is then the
        whole reconstruction norm); "ip": -<q, C_l[k]>.
        """
        books = self._codebooks[:num_levels].reshape(-1, self.dim)
        luts = np.empty((len(queries), len(books)), np.float32)
        scale = np.float32(-1.0 if mode == "ip" else -2.0)

        def job(q0: int, q1: int) -> None:
            kernels.scaled_dots(queries[q0:q1], books, scale, luts[q0:q1])

        kernels.run_split(job, len(queries), kernels.worker_count(luts.size * self.dim // 4))
        if mode == "aqd" and num_levels == 1:
            luts += self._codeword_sq_norms[0]
        return luts

    def _scan_layout(self) -> tuple[np.ndarray, int]:
        """The codes as the scan kernels read them, and the row stride."""
        if self._packed:
            return self._codes.view(np.uint32).reshape(-1), self._code_width // 4
        return self._codes, self._code_width

    def _scan(
        self, luts: np.ndarray, num_levels: int, mode: str, k: int, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows (nq, k) and their scores (without ||q||^2) for tables from
        _lookup_tables: over every item, or over the nprobe nearest cells."""
        if nprobe is not None:
            return self._scan_cells(luts, num_levels, mode, k, nprobe)
        has_norm = mode == "aqd" and num_levels > 1
        norms = self._norms_for(num_levels) if has_norm else np.empty(0, np.float32)
        nq, n = len(luts), self.ntotal
        codes, stride = self._scan_layout()
        scan = kernels.scan_kernel(num_levels, stride, self._packed)
        threads = kernels.worker_count(nq * n * num_levels)
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

            kernels.run_split(by_queries, nq, threads)
            return out_d, out_r
        # fewer queries than threads: split the database, then merge the per-shard lists
        shards = kernels.split_range(n, 4 * threads)
        width = min(k, max(stop - first for first, stop in shards))  # a shard's reach
        shard_d = np.empty((len(shards), nq, width), np.float32)
        shard_r = np.empty((len(shards), nq, width), np.int64)

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
                    width,
                    shard_d[shard],
                    shard_r[shard],
                )

        kernels.run_split(by_rows, len(shards), threads)
        return kernels.merge_shards(shard_d, shard_r, k)

    def _scan_cells(
        self, luts: np.ndarray, num_levels: int, mode: str, k: int, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows over the nprobe cells nearest each query (cells of the first
        min(num_levels, p) codes) and every item of the ungrouped tail, scored exactly as
        :meth:`_scan` scores them."""
        cell_d, cell_r = self._scan_grouped_cells(luts, num_levels, mode, k, nprobe)
        first, stop = self._grouped, self.ntotal
        if first == stop:
            return cell_d, cell_r
        has_norm = mode == "aqd" and num_levels > 1
        norms = self._norms_for(num_levels) if has_norm else np.empty(0, np.float32)
        codes, stride = self._scan_layout()
        scan = kernels.scan_kernel(num_levels, stride, self._packed)
        width = min(k, stop - first)
        tail_d = np.empty((len(luts), width), np.float32)
        tail_r = np.empty((len(luts), width), np.int64)
        scan(codes, first, stop, self.codebook_size, norms, luts, width, tail_d, tail_r)
        padded_d = np.full((2, len(luts), k), np.inf, np.float32)
        padded_r = np.full((2, len(luts), k), -1, np.int64)
        padded_d[0], padded_r[0] = cell_d, cell_r
        padded_d[1, :, :width], padded_r[1, :, :width] = tail_d, tail_r
        return kernels.merge_shards(padded_d, padded_r, k)

    def _scan_grouped_cells(
        self, luts: np.ndarray, num_levels: int, mode: str, k: int, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows over the nprobe cells nearest each query among the grouped rows
        [0, _grouped)."""
        cell_levels = min(num_levels, self._partition_levels)
        starts, stops, cell_codes, cell_norms = self._cell_table(cell_levels)
        nq, n_cells = len(luts), len(starts)
        probe = min(nprobe, n_cells)
        # "aqd": the distance to the cell's prefix reconstruction; a one-level table has
        # its norms folded in already
        rank_norms = cell_norms if mode == "aqd" and num_levels > 1 else np.empty(0, np.float32)
        cells = np.empty((nq, probe), np.int64)

        def rank(q0: int, q1: int) -> None:
            kernels.rank_cells(
                luts[q0:q1], cell_codes, rank_norms, self.codebook_size, cells[q0:q1]
            )

        kernels.run_split(rank, nq, kernels.worker_count(nq * n_cells * cell_levels))
        has_norm = mode == "aqd" and num_levels > 1
        norms = self._norms_for(num_levels) if has_norm else np.empty(0, np.float32)
        codes, stride = self._scan_layout()
        scan = kernels.cell_scan_kernel(num_levels, cell_levels, stride, self._packed)
        reach = probe * self.ntotal // max(n_cells, 1)  # expected items scanned per query
        threads = kernels.worker_count(nq * reach * num_levels)
        if nq >= threads:  # split the queries
            out_d = np.empty((nq, k), np.float32)
            out_r = np.empty((nq, k), np.int64)

            def by_queries(q0: int, q1: int) -> None:
                scan(
                    codes,
                    starts,
                    stops,
                    cells[q0:q1],
                    self.codebook_size,
                    norms,
                    luts[q0:q1],
                    k,
                    out_d[q0:q1],
                    out_r[q0:q1],
                )

            kernels.run_split(by_queries, nq, threads)
            return out_d, out_r
        # fewer queries than threads: split each query's cell list, then merge
        pieces = kernels.split_range(probe, 4 * threads)
        shard_d = np.empty((len(pieces), nq, k), np.float32)
        shard_r = np.empty((len(pieces), nq, k), np.int64)

        def by_cells(s0: int, s1: int) -> None:
            for shard in range(s0, s1):
                first, stop = pieces[shard]
                scan(
                    codes,
                    starts,
                    stops,
                    np.ascontiguousarray(cells[:, first:stop]),
                    self.codebook_size,
                    norms,
                    luts,
                    k,
                    shard_d[shard],
                    shard_r[shard],
                )

        kernels.run_split(by_cells, len(pieces), threads)
        return kernels.merge_shards(shard_d, shard_r, k)

    def search(
        self,
        queries: Any,
        k: int,
        num_levels: int | None = None,
        mode: Literal["aqd", "ip"] | None = None,
        rerank_from: int | None = None,
        rerank_candidates: int | None = None,
        nprobe: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest items per query by AQD (Eq. 30) using the first ``num_levels`` codes.

        queries: float (nq, D). mode "aqd": squared Euclidean distance from the query to each
        item's reconstruction; mode "ip": ranks by inner product with the reconstruction and
        returns its negative (so smaller is better in both modes); None: the index's
        :attr:`search_mode`. rerank_from=l0 shortlists
        ``rerank_candidates`` items (default max(10 k, 100)) with the first l0 levels, then
        re-ranks them with ``num_levels`` levels. nprobe (a partitioned index only): scan
        only the items of the nprobe non-empty cells nearest the query (cells of the first
        min(partition_levels, l) codes, l the prefix being scanned: rerank_from for the
        shortlist; faiss IVF counts empty lists too, so :meth:`to_faiss` with ivf=True
        agrees where no cell is empty), plus the items added since the cells were last
        regrouped, while they are at most 1/64 of the index (so that adding between searches
        costs no O(N) regrouping; see :attr:`ungrouped`); None scans every item; nprobe >=
        the number of cells gives exactly the results of a full scan.

        k: 1..MAX_K. Returns distances float32 (nq, w) ascending and ids int64 (nq, w) with
        w = min(k, ntotal); where fewer than w items are reachable (nprobe) the rest is
        inf / -1. Ties are ordered by position in the index.
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
            rerank_candidates = _check_k(rerank_candidates, "rerank_candidates")
        nprobe = self._check_nprobe(nprobe)
        q = self._check_queries(queries)
        self.group_added(only_if_large=True)
        nq, width = len(q), min(k, self.ntotal)
        out_d = np.full((nq, width), np.inf, np.float32)
        out_i = np.full((nq, width), -1, np.int64)
        if nq == 0 or width == 0:
            return out_d, out_i
        lut_bytes = levels * self.codebook_size * 4
        batch = max(1, min(nq, _MAX_LUT_BYTES // lut_bytes))
        for start in range(0, nq, batch):
            qb = q[start : start + batch]
            dist, rows = self._search_batch(
                qb, width, levels, mode, rerank_from, rerank_candidates, nprobe
            )
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
        nprobe: int | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores (without ||q||^2) float32 (nq, k) and rows int64 (nq, k) of one batch."""
        luts = self._lookup_tables(qb, levels, mode)
        if rerank_from is None:
            return self._scan(luts, levels, mode, k, nprobe)
        shortlist = min(max(k, rerank_candidates or max(10 * k, 100)), self.ntotal)
        if rerank_from == 1 and mode == "aqd":  # its table folds in the level-1 norm
            short_luts = self._lookup_tables(qb, 1, mode)
        else:
            short_luts = np.ascontiguousarray(luts[:, : rerank_from * self.codebook_size])
        _, candidates = self._scan(short_luts, rerank_from, mode, shortlist, nprobe)
        # levels > rerank_from >= 1, so an "aqd" table here never holds folded norms
        norms = self._norms_for(levels) if mode == "aqd" else np.empty(0, np.float32)
        out_d = np.empty((len(qb), k), np.float32)
        out_r = np.empty((len(qb), k), np.int64)

        def rerank(q0: int, q1: int) -> None:
            kernels.rerank_topk(
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
        kernels.run_split(rerank, len(qb), kernels.worker_count(work))
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

    def _file_header(
        self, ntotal: int | None = None, next_id: int | None = None, **changes: Any
    ) -> dict[str, Any]:
        """The JSON header of a file holding this index (or, with the overrides, of one made
        from it by appending or merging)."""
        header = {
            "num_levels": self.num_levels,
            "codebook_size": self.codebook_size,
            "dim": self.dim,
            "ntotal": self.ntotal if ntotal is None else int(ntotal),
            "assignment": self.assignment,
            "search_mode": self.search_mode,
            "codebook_sha256": self.codebook_sha256,
            "next_id": self._next_id if next_id is None else int(next_id),
            "has_labels": self._has_labels,
            "metadata": self.metadata,
            "partition_levels": self._partition_levels,
            "code_width": self._code_width,
        }
        header.update(changes)
        return header

    def _file_columns(self) -> dict[str, np.ndarray]:
        """Per-item arrays as a file stores them (index order): codes (N, W), ids, norms of
        the full reconstruction, labels if any."""
        self._group()
        columns = {
            "codes": self._codes,
            "ids": self._ids,
            "norms": self._norms_for(self.num_levels),
        }
        if self._has_labels:
            columns["labels"] = self._labels
        return columns

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the index to one .npz file (no pickle, uncompressed), atomically.

        Holds codebooks, codes (N, W), ids, norms, cell offsets (partitioned), optional
        labels and a JSON header with the config, format version and sha256 digests (see
        :mod:`dpq.index.storage`); its arrays can be memory-mapped by ``load(mmap=True)``.
        Returns the path.
        """
        arrays: dict[str, np.ndarray] = {"codebooks": self._codebooks, **self._file_columns()}
        if self._partition_levels:
            arrays["offsets"] = self._offsets
        return write_index_file(path, self._file_header(), arrays)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], mmap: bool = False, verify: bool = True
    ) -> DPQIndex:
        """Read an index written by :meth:`save`; verifies format version and checksum.

        mmap=True: codes, norms, ids and labels stay in the file and are paged in as
        searches touch them (for files larger than memory); the index is then read-only
        (add / remove raise; :func:`dpq.index.append_to_index_file` grows the file).
        verify=True reads every array once to check its sha256 digest (about 1 s per GB on
        one core, spread over threads); verify=False checks only the header's checksum and
        the array sizes. Version-1 files are read into memory (save them again to map them).

        Raises FileNotFoundError if absent, IndexFileError (a ValueError) naming the file if
        it is truncated, tampered with, or of another format version.
        """
        source = Path(path)
        header, arrays = read_index_file(source, mmap=mmap, verify=verify)
        for name in ("codebooks", "codes", "ids"):
            if name not in arrays:
                raise IndexFileError(f"{source} lacks the {name!r} array.")
        try:
            index = cls(
                arrays["codebooks"],
                header["assignment"],
                header.get("metadata"),
                search_mode=header.get("search_mode", "aqd"),  # absent in older files
                partition_levels=header.get("partition_levels", 0),
            )
            expected = (header["num_levels"], header["codebook_size"], header["dim"])
            if index._codebooks.shape != tuple(expected):
                raise ValueError(f"codebooks shape {index._codebooks.shape} != header {expected}")
            if header["format_version"] == 1:
                index.add(arrays["codes"], ids=arrays["ids"], labels=arrays.get("labels"))
            else:
                index._attach(arrays, header, str(source) if mmap else None)
            if index.ntotal != header["ntotal"]:
                raise ValueError(f"{index.ntotal} items but the header says {header['ntotal']}")
            index._next_id = max(index._next_id, int(header.get("next_id", 0)))
        except (ValueError, KeyError, TypeError) as exc:
            raise IndexFileError(f"{source} holds an inconsistent index: {exc}") from None
        return index

    def _attach(
        self, arrays: Mapping[str, np.ndarray], header: Mapping[str, Any], mapped: str | None
    ) -> None:
        """Use the arrays of a version-2 file as this (empty) index's storage, after checking
        their shapes, dtypes and the cell offsets. mapped: the file, when memory-mapped."""
        codes, ids, norms = arrays["codes"], arrays["ids"], arrays.get("norms")
        n = int(header["ntotal"])
        if codes.shape != (n, self._code_width) or codes.dtype != self._code_dtype:
            raise ValueError(
                f"codes are {codes.dtype} {codes.shape}; expected {self._code_dtype} "
                f"{(n, self._code_width)}"
            )
        if ids.shape != (n,) or ids.dtype != np.int64:
            raise ValueError(f"ids are {ids.dtype} {ids.shape}; expected int64 ({n},)")
        if norms is None or norms.shape != (n,) or norms.dtype != np.float32:
            raise ValueError(f"norms must be float32 ({n},)")
        if n and np.iinfo(self._code_dtype).max >= self.codebook_size:  # values can overflow K
            for start in range(0, n, 1 << 24):
                if int(codes[start : start + (1 << 24)].max()) >= self.codebook_size:
                    raise ValueError(f"codes out of range for codebook_size {self.codebook_size}")
        columns = {"codes": codes, "ids": ids, self._norm_column(self.num_levels): norms}
        self._has_labels = bool(header.get("has_labels", False))
        if self._has_labels:
            labels = arrays.get("labels")
            if labels is None or labels.shape[:1] != (n,) or labels.ndim not in (1, 2):
                raise ValueError("labels are missing or not one per item")
            columns["labels"] = labels
        if self._partition_levels:
            offsets = arrays.get("offsets")
            if (
                offsets is None
                or offsets.shape != (self._n_cells() + 1,)
                or offsets[0] != 0
                or offsets[-1] != n
                or np.any(np.diff(offsets) < 0)
            ):
                raise ValueError("cell offsets are missing or inconsistent with the items")
            self._offsets = np.array(offsets, np.int64)
        if not mapped:  # arrays read into memory are writable already: no second copy
            columns = {
                name: arr if arr.flags.writeable else np.array(arr) for name, arr in columns.items()
            }
        self._rows.attach(columns, n)
        self._grouped = n
        if not self._partition_levels:
            self._offsets = np.array([0, n], np.int64)
        self._read_only = mapped
        self._layout_changed()

    # ---- faiss interop ----------------------------------------------------------------------

    def to_faiss(self, mode: Literal["aqd", "ip"] | None = None, ivf: bool = False):
        """A faiss index holding these codebooks and codes (no re-encoding).

        ivf=False: an IndexResidualQuantizer (wrapped in an IndexIDMap2 when the ids are not
        0..N-1). ivf=True: an IndexIVFResidualQuantizer whose coarse quantizer holds the
        first p = max(1, partition_levels) codebooks (K^p lists: an IndexFlat for p = 1, a
        ResidualCoarseQuantizer for p = 2) and whose residual quantizer holds the rest; its
        ``nprobe`` matches :meth:`search`'s. mode "aqd": METRIC_L2 with ST_norm_float (a
        float norm per item); "ip": METRIC_INNER_PRODUCT with ST_LUT_nonorm (faiss returns
        +inner products); None: this index's :attr:`search_mode`. Needs K = 2^b, b in 1..16.
        See :mod:`dpq.index.faiss_interop`.
        """
        from dpq.index import faiss_interop

        self._group()
        if ivf:
            return faiss_interop.to_faiss_ivf(self, mode)
        return faiss_interop.to_faiss_flat(self, mode)

    @classmethod
    def from_faiss(
        cls,
        index: Any,
        assignment: Literal["euclidean", "cosine"] = "euclidean",
        metadata: Mapping[str, Any] | None = None,
    ) -> DPQIndex:
        """Build from a faiss IndexResidualQuantizer (optionally in an IndexIDMap/IndexIDMap2)
        or an IndexIVFResidualQuantizer as :meth:`to_faiss` writes it (in memory or with
        on-disk inverted lists): codebooks, codes and ids are read back; an inner-product
        faiss index gives ``search_mode="ip"``, an IVF one the matching partition_levels."""
        from dpq.index import faiss_interop

        return faiss_interop.from_faiss(cls, index, assignment, metadata)
