"""The code store of an index: what is stored per item, and how items are grouped into cells.

A :class:`CodeStore` holds, in one row order, the codes (N, W) of the items, their ids,
optional labels and the squared norms of their prefix reconstructions (the full-length
norm always, shorter prefixes cached the first time they are asked for). Codes are stored
row-major; uint8 rows are padded to whole 32-bit words (W = L rounded up to a multiple of
4) so a scan reads four codes with one load; uint16 rows have W = L.

Cells (``partition_levels`` p = 1 or 2, see :mod:`dpq.index.cells`): rows [0, grouped) are
grouped by their first p codes as ``offsets`` says; rows appended since, [grouped, ntotal),
wait in a tail until :meth:`CodeStore.group` merges them into their cells (one O(N) pass).
"Storage order" below is this order; after :meth:`CodeStore.group` it is the index order
(cell by cell, insertion order within a cell). An unpartitioned store is one cell and has
no tail.

The store is what searches read (:mod:`dpq.index.search`) and what the file and faiss
functions use; it knows nothing of search modes or files. numpy and numba only.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from dpq.index import cells as cell_math
from dpq.index import kernels
from dpq.index.checks import check_ids
from dpq.index.codebooks import code_dtype
from dpq.index.rows import Rows

__all__ = ["CellTable", "CodeStore", "IdOrder"]

# group_added(only_if_large=True) leaves the tail while it holds at most N / TAIL_FRACTION
# items: a service that adds between searches then pays O(tail) per search (the tail is
# scanned beside the probed cells), not an O(N) regrouping per add.
TAIL_FRACTION = 64
# uint8 codes are stored with rows padded to whole 32-bit words: one load reads 4 codes.
_PACK_WORDS = sys.byteorder == "little"


class CellTable(NamedTuple):
    """The non-empty cells of the first ``levels`` <= p codes, for ranking cells per query:
    row starts and stops int64 (C,), their codes int64 (C, levels) and the squared norms of
    their prefix reconstructions float32 (C,)."""

    starts: np.ndarray
    stops: np.ndarray
    codes: np.ndarray
    norms: np.ndarray


class CodeStore:
    """Per-item arrays of a coded database and their grouping into cells (see module doc).

    Args:
        codebooks: float32 (L, K, D), already checked (:func:`dpq.index.codebooks.check_codebooks`);
            kept read-only.
        partition_levels: 0, 1 or 2 (see :func:`dpq.index.cells.check_partition_levels`).
    """

    def __init__(self, codebooks: np.ndarray, partition_levels: int = 0) -> None:
        self._codebooks = codebooks
        self._codebooks.setflags(write=False)
        num_levels, codebook_size, _ = codebooks.shape
        self.code_dtype = code_dtype(codebook_size)
        self.packed = _PACK_WORDS and self.code_dtype == np.uint8
        self.code_width = 4 * -(-num_levels // 4) if self.packed else num_levels
        self.codeword_sq_norms = np.einsum("lkd,lkd->lk", codebooks, codebooks)
        self._partition_levels = cell_math.check_partition_levels(
            partition_levels, num_levels, codebook_size
        )
        self._rows = Rows()
        self._has_labels = False
        self._mapped_from: str | None = None  # the file, when the arrays are memory-mapped
        self._next_id = 0
        self._id_order = IdOrder()
        # rows [0, _grouped) are grouped by cell as _offsets says; later rows wait (a tail)
        self._offsets = np.zeros(self.n_cells + 1, np.int64)
        self._grouped = 0
        self._cell_tables: dict[int, CellTable] = {}
        # searches may run on several threads (the kernels release the GIL): the lazy steps
        # they share (grouping, cached norms and cell tables) run one at a time
        self._lazy_lock = threading.RLock()

    # ---- shape and state ---------------------------------------------------------------------

    @property
    def codebooks(self) -> np.ndarray:
        """float32 (L, K, D), read-only."""
        return self._codebooks

    @property
    def num_levels(self) -> int:
        return int(self._codebooks.shape[0])

    @property
    def codebook_size(self) -> int:
        return int(self._codebooks.shape[1])

    @property
    def dim(self) -> int:
        return int(self._codebooks.shape[2])

    @property
    def ntotal(self) -> int:
        """Number of items stored."""
        return int(self._rows.size)

    @property
    def capacity(self) -> int:
        """Items the code array holds before it grows (its allocated rows)."""
        return self._rows.capacity("codes")

    @property
    def partition_levels(self) -> int:
        return self._partition_levels

    @property
    def n_cells(self) -> int:
        """K^p cells (1 when unpartitioned)."""
        return cell_math.cell_count(self.codebook_size, self._partition_levels)

    @property
    def offsets(self) -> np.ndarray:
        """int64 (K^p + 1,): cell c holds the grouped rows offsets[c]:offsets[c + 1]."""
        return self._offsets

    @property
    def grouped(self) -> int:
        """Rows [0, grouped) are grouped by cell; the rest is the tail."""
        return self._grouped

    @property
    def ungrouped(self) -> int:
        """Rows in the tail (appended since the last grouping)."""
        return self.ntotal - self._grouped

    @property
    def has_labels(self) -> bool:
        return self._has_labels

    @property
    def mapped_from(self) -> str | None:
        """The file the arrays are memory-mapped from (the store is then read-only), or None."""
        return self._mapped_from

    @property
    def next_id(self) -> int:
        """The id :meth:`append` gives the next item when no ids are passed."""
        return self._next_id

    def advance_next_id(self, next_id: int) -> None:
        """Give default ids from at least ``next_id`` on (e.g. a file's counter)."""
        self._next_id = max(self._next_id, int(next_id))

    def nbytes(self) -> int:
        """Bytes of every per-item array (codes, ids, labels, cached norms) and the offsets."""
        return int(self._rows.nbytes() + self._offsets.nbytes)

    # ---- per-item arrays, in storage order (no grouping) ----------------------------------------

    @property
    def codes(self) -> np.ndarray:
        """Stored code rows (N, code_width), uint8 or uint16; the first L columns are codes."""
        if "codes" in self._rows:
            return self._rows.get("codes")
        return np.zeros((0, self.code_width), dtype=self.code_dtype)

    @property
    def ids(self) -> np.ndarray:
        """int64 (N,) item ids."""
        return self._rows.get("ids") if "ids" in self._rows else np.empty(0, np.int64)

    @property
    def labels(self) -> np.ndarray | None:
        """int64 (N,) or multi-hot uint8 (N, C) labels; None without labels."""
        return self._rows.get("labels") if "labels" in self._rows else None

    def norms(self, num_levels: int) -> np.ndarray:
        """float32 (N,) squared reconstruction norms at this prefix (computed once, cached)."""
        name = _norm_column(num_levels)
        with self._lazy_lock:
            if name not in self._rows:
                norms = kernels.compute_prefix_norms(self.codes, self._codebooks, [num_levels])
                self._rows.set_column(name, norms[0])
            return self._rows.get(name)

    def scan_layout(self) -> tuple[np.ndarray, int]:
        """The codes as the scan kernels read them, and the row stride: uint32 (N * W / 4,)
        words when packed, else the (N, W) rows."""
        if self.packed:
            return self.codes.view(np.uint32).reshape(-1), self.code_width // 4
        return self.codes, self.code_width

    def file_columns(self) -> dict[str, np.ndarray]:
        """Per-item arrays as an index file stores them, in index order (groups the tail
        first): codes (N, W), ids, norms of the full reconstruction, labels if any."""
        self.group()
        columns = {"codes": self.codes, "ids": self.ids, "norms": self.norms(self.num_levels)}
        if self._has_labels:
            columns["labels"] = self.labels
        return columns

    # ---- cells -------------------------------------------------------------------------------

    def group_added(self, only_if_large: bool = False) -> None:
        """Merge the tail into its cells; ``only_if_large``: only when it holds more than
        N / TAIL_FRACTION items."""
        if not only_if_large or self.ungrouped > self.ntotal // TAIL_FRACTION:
            self.group()

    def group(self) -> None:
        """Merge the tail into its cells (one O(N) pass); storage order is index order after."""
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
        tail_cells = cell_math.cells_of(self.codes[g:], self._partition_levels, self.codebook_size)
        tail_order, tail_offsets = cell_math.group_order(tail_cells, self.n_cells)
        sources = [self._offsets, tail_offsets]
        kept, moved = cell_math.interleave_positions(sources, 0, self.n_cells)
        order = np.empty(n, np.int64)
        order[kept] = np.arange(g)
        order[moved] = g + tail_order
        self._rows.take(order)
        self._offsets = cell_math.merged_offsets(sources)
        self._grouped = n
        self._layout_changed()

    def repartition(self, partition_levels: int) -> None:
        """Regroup every row by its first ``partition_levels`` codes (0, 1 or 2)."""
        self.check_writable()
        self._partition_levels = cell_math.check_partition_levels(
            partition_levels, self.num_levels, self.codebook_size
        )
        self._offsets = np.zeros(self.n_cells + 1, np.int64)
        self._grouped = 0
        self._layout_changed()
        self.group()

    def cell_table(self, levels: int) -> CellTable:
        """The non-empty cells of the first ``levels`` <= p codes among the grouped rows
        (cached until the rows change)."""
        with self._lazy_lock:
            if levels not in self._cell_tables:
                offsets = cell_math.coarser_offsets(
                    self._offsets, self.codebook_size, self._partition_levels, levels
                )
                cells = np.flatnonzero(np.diff(offsets))
                codes = cell_math.cell_codes(cells, levels, self.codebook_size)
                norms = kernels.compute_prefix_norms(codes, self._codebooks, [levels])[0]
                self._cell_tables[levels] = CellTable(
                    offsets[cells], offsets[cells + 1], codes, norms
                )
            return self._cell_tables[levels]

    def _layout_changed(self) -> None:
        self._id_order.order = None
        self._cell_tables = {}

    # ---- checks of new items -------------------------------------------------------------------

    def check_writable(self) -> None:
        """ValueError if the arrays are memory-mapped from a file."""
        if self._mapped_from is not None:
            raise ValueError(
                f"this index is memory-mapped from {self._mapped_from} and read-only; load it "
                "without mmap=True to change it, or use dpq.index.append_to_index_file."
            )

    def check_codes(self, codes: Any) -> np.ndarray:
        """Integer codes (N, L) in 0..K-1 as the stored dtype, else a ValueError."""
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
        return arr.astype(self.code_dtype, copy=False)

    def check_new_ids(self, ids: Any, n: int) -> np.ndarray:
        """int64 (n,) ids for n new items: the given ones (unique, >= 0, not stored yet) or,
        for None, the next n of the counter."""
        if ids is None:
            return np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        arr = check_ids(ids, n)
        found = self.rows_of(arr)[1] if self.ntotal else np.zeros(n, bool)
        if found.any():
            raise ValueError(
                f"{int(found.sum())} id(s) are already in the index (first: {int(arr[found][0])}); "
                "remove them first or use other ids."
            )
        return arr

    def check_new_labels(self, labels: Any, n: int) -> np.ndarray | None:
        """Labels of n new items as stored (int64 (n,) or uint8 multi-hot (n, C)), matching
        the stored ones; None for none."""
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
            stored = self.labels
            if stored.shape[1:] != arr.shape[1:]:
                raise ValueError(
                    f"labels shape per item must be {stored.shape[1:]} as in the index; "
                    f"got {arr.shape[1:]}."
                )
            arr = arr.astype(stored.dtype)
        return arr

    # ---- changing the items ----------------------------------------------------------------------

    def reserve(self, ntotal: int) -> None:
        """Make room for ``ntotal`` items so appends up to that size never copy the arrays."""
        self.check_writable()
        self._rows.reserve(int(ntotal))

    def append(self, codes: Any, ids: Any = None, labels: Any = None) -> np.ndarray:
        """Append items (checked as :meth:`check_codes`, :meth:`check_new_ids` and
        :meth:`check_new_labels` say) in amortised O(items); they join the tail of a
        partitioned store. Returns their int64 (n,) ids."""
        self.check_writable()
        codes_arr = self.check_codes(codes)
        n = codes_arr.shape[0]
        new_ids = self.check_new_ids(ids, n)
        new_labels = self.check_new_labels(labels, n)
        if self.ntotal == 0:  # an empty store takes the new items' labelling
            self._rows.clear()
            self._has_labels = new_labels is not None
            self._grouped = 0
            self._offsets = np.zeros(self.n_cells + 1, np.int64)
        rows = np.zeros((n, self.code_width), dtype=self.code_dtype)
        rows[:, : self.num_levels] = codes_arr
        cached = sorted(
            {self.num_levels}
            | {int(name.split(":")[1]) for name in self._rows.names() if name.startswith("norms:")}
        )
        new_norms = kernels.compute_prefix_norms(rows, self._codebooks, cached)
        appended = {"codes": rows, "ids": new_ids}
        appended.update({_norm_column(lv): new_norms[j] for j, lv in enumerate(cached)})
        if new_labels is not None:
            appended["labels"] = new_labels
        previous_n = self.ntotal
        self._rows.append(appended)
        if n:
            self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        if self._partition_levels == 0:
            self.group()  # one cell: no row moves
        if self._partition_levels == 0 or self._grouped == 0:
            self._cell_tables = {}
        # else: the grouped rows and their cells stand; the new rows wait in the tail
        self._id_order.appended(self.ids, previous_n, new_ids)
        return new_ids

    def remove(self, ids: Any) -> int:
        """Remove the items with these ids (unknown ids are ignored); the others keep their
        order and cells. Returns how many went."""
        self.check_writable()
        self.group()
        rows, found = self.rows_of(ids)
        rows = np.unique(rows[found])
        if rows.size == 0:
            return 0
        keep = np.ones(self.ntotal, bool)
        keep[rows] = False
        cells = np.searchsorted(self._offsets, rows, side="right") - 1
        removed = np.bincount(cells, minlength=self.n_cells)
        self._rows.take(keep)
        self._offsets = self._offsets - cell_math.offsets_from_counts(removed)
        self._grouped = self.ntotal
        self._layout_changed()
        return int(rows.size)

    def attach(
        self, arrays: Mapping[str, np.ndarray], ntotal: int, has_labels: bool, mapped: str | None
    ) -> None:
        """Use the arrays of an index file (codes (N, W), ids, norms, labels, offsets) as
        this empty store's rows, without copying, after checking their shapes, dtypes, code
        range and cell offsets (ValueError). mapped: the file, when they are memory-mapped
        (the store is then read-only)."""
        codes, ids, norms = arrays["codes"], arrays["ids"], arrays.get("norms")
        n = int(ntotal)
        if codes.shape != (n, self.code_width) or codes.dtype != self.code_dtype:
            raise ValueError(
                f"codes are {codes.dtype} {codes.shape}; expected {self.code_dtype} "
                f"{(n, self.code_width)}"
            )
        if ids.shape != (n,) or ids.dtype != np.int64:
            raise ValueError(f"ids are {ids.dtype} {ids.shape}; expected int64 ({n},)")
        if norms is None or norms.shape != (n,) or norms.dtype != np.float32:
            raise ValueError(f"norms must be float32 ({n},)")
        if n and np.iinfo(self.code_dtype).max >= self.codebook_size:  # values can overflow K
            for start in range(0, n, 1 << 24):
                if int(codes[start : start + (1 << 24)].max()) >= self.codebook_size:
                    raise ValueError(f"codes out of range for codebook_size {self.codebook_size}")
        columns = {"codes": codes, "ids": ids, _norm_column(self.num_levels): norms}
        self._has_labels = bool(has_labels)
        if self._has_labels:
            labels = arrays.get("labels")
            if labels is None or labels.shape[:1] != (n,) or labels.ndim not in (1, 2):
                raise ValueError("labels are missing or not one per item")
            columns["labels"] = labels
        if self._partition_levels:
            offsets = arrays.get("offsets")
            if (
                offsets is None
                or offsets.shape != (self.n_cells + 1,)
                or offsets[0] != 0
                or offsets[-1] != n
                or np.any(np.diff(offsets) < 0)
            ):
                raise ValueError("cell offsets are missing or inconsistent with the items")
            self._offsets = np.array(offsets, np.int64)
        else:
            self._offsets = np.array([0, n], np.int64)
        if not mapped:  # arrays read into memory are writable already: no second copy
            columns = {
                name: arr if arr.flags.writeable else np.array(arr) for name, arr in columns.items()
            }
        self._rows.attach(columns, n)
        self._grouped = n
        self._mapped_from = mapped
        self._layout_changed()

    def rows_of(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """Rows int64 (n,) (storage order; -1 where absent) of ids (n,) and a bool (n,) mask
        of which were found. Leaves the tail where it is."""
        return self._id_order.rows_of(self.ids, ids)


class IdOrder:
    """The rows of a store sorted by id, for lookups by id (faiss's ``DirectMap``, by
    sorting): built at the first lookup, extended without sorting when appended ids all
    follow the stored ones (a counter, as a service adds), dropped when rows move."""

    def __init__(self) -> None:
        self.order: np.ndarray | None = None  # int64 (N,) rows in id order; None: not built

    def appended(self, stored: np.ndarray, previous_n: int, new_ids: np.ndarray) -> None:
        """Take note that ``new_ids`` went to rows previous_n.. of the stored ids (N,)."""
        previous = self.order
        if previous is None or len(previous) != previous_n:
            self.order = None
        elif previous_n and len(new_ids) and new_ids.min() <= stored[previous[-1]]:
            self.order = None
        else:
            self.order = np.concatenate([previous, previous_n + np.argsort(new_ids, kind="stable")])

    def rows_of(self, stored: np.ndarray, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """Rows int64 (n,) in stored ids (N,) of ids (n,), -1 where absent, and a bool (n,)
        mask of which were found; ValueError unless ids are 1-D integers."""
        arr = np.asarray(ids)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(
                f"ids must be a 1-D integer array; got shape {arr.shape}, {arr.dtype}."
            )
        arr = arr.astype(np.int64)
        if self.order is None:
            self.order = np.argsort(stored, kind="stable")
        if not len(stored):
            return np.full(arr.shape, -1, np.int64), np.zeros(arr.shape, bool)
        sorted_ids = stored[self.order]
        pos = np.minimum(np.searchsorted(sorted_ids, arr), len(sorted_ids) - 1)
        found = sorted_ids[pos] == arr
        return np.where(found, self.order[pos], -1).astype(np.int64), found


def _norm_column(num_levels: int) -> str:
    return f"norms:{num_levels}"
