"""Cells of a partitioned index: items grouped by their first ``partition_levels`` codes.

With K codewords per level the first p codes of an item name one of K^p cells,
``cell = sum_i codes[i] * K^(p-1-i)`` (the first code most significant), so the cells of a
shorter prefix are runs of consecutive cells: rows grouped by two codes are also grouped by
one. A grouping is an offsets array int64 (K^p + 1,): cell c holds rows
``offsets[c]:offsets[c + 1]``. numpy only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

# Most cells a partition may have (offsets of 8 bytes each: 128 MiB).
MAX_CELLS = 1 << 24
PARTITION_LEVELS = (0, 1, 2)


def cell_count(codebook_size: int, partition_levels: int) -> int:
    """Number of cells K^p (1 for an unpartitioned index)."""
    return int(codebook_size) ** int(partition_levels)


def check_partition_levels(partition_levels: Any, num_levels: int, codebook_size: int) -> int:
    """p in PARTITION_LEVELS, at most num_levels, with at most MAX_CELLS cells; else a
    ValueError saying which bound it breaks."""
    if isinstance(partition_levels, bool) or not isinstance(partition_levels, int | np.integer):
        raise ValueError(f"partition_levels must be 0, 1 or 2; got {partition_levels!r}.")
    p = int(partition_levels)
    if p not in PARTITION_LEVELS or p > num_levels:
        raise ValueError(
            f"partition_levels must be one of {PARTITION_LEVELS} and at most "
            f"num_levels={num_levels}; got {partition_levels}."
        )
    if cell_count(codebook_size, p) > MAX_CELLS:
        raise ValueError(
            f"partition_levels={p} with codebook_size {codebook_size} makes "
            f"{codebook_size}^{p} cells, more than {MAX_CELLS}; use partition_levels=1."
        )
    return p


def cells_of(codes: np.ndarray, partition_levels: int, codebook_size: int) -> np.ndarray:
    """int64 (N,) cell of each row of codes (N, >= p): its first p codes, first most significant."""
    cells = np.zeros(codes.shape[0], np.int64)
    for level in range(partition_levels):
        cells *= codebook_size
        cells += codes[:, level]
    return cells


def cell_codes(cells: np.ndarray, partition_levels: int, codebook_size: int) -> np.ndarray:
    """int64 (C, p) the first p codes of each cell id in cells (C,)."""
    out = np.empty((len(cells), partition_levels), np.int64)
    rest = np.asarray(cells, np.int64).copy()
    for level in range(partition_levels - 1, -1, -1):
        out[:, level] = rest % codebook_size
        rest //= codebook_size
    return out


def offsets_from_counts(counts: np.ndarray) -> np.ndarray:
    """int64 (C + 1,) offsets of cells holding counts (C,) rows each."""
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def coarser_offsets(
    offsets: np.ndarray, codebook_size: int, partition_levels: int, levels: int
) -> np.ndarray:
    """Offsets of the same rows grouped by their first ``levels`` <= p codes only."""
    return offsets[:: codebook_size ** (partition_levels - levels)]


def group_order(cells: np.ndarray, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable order that groups rows by cell, and the offsets of the grouped rows.

    cells int64 (N,) in 0..n_cells-1. Returns order int64 (N,) (rows of a cell keep their
    relative order) and offsets int64 (n_cells + 1,).
    """
    order = np.argsort(cells, kind="stable")
    return order, offsets_from_counts(np.bincount(cells, minlength=n_cells))


def interleave_positions(
    source_offsets: Sequence[np.ndarray], first_cell: int, stop_cell: int
) -> list[np.ndarray]:
    """Where the rows of several groupings go when they are merged cell by cell.

    The merged grouping holds, in each cell, the rows of source 0 in that cell, then those
    of source 1, and so on. For cells first_cell..stop_cell-1 returns, per source, int64
    positions (relative to the merged block's first row) of that source's rows
    ``offsets[first_cell]:offsets[stop_cell]``, in order.
    """
    counts = np.stack([np.diff(off[first_cell : stop_cell + 1]) for off in source_offsets])
    totals = counts.sum(axis=0)
    cell_start = np.concatenate([[0], np.cumsum(totals)[:-1]]).astype(np.int64)
    before = np.cumsum(counts, axis=0) - counts  # rows of earlier sources in the same cell
    positions = []
    for s, off in enumerate(source_offsets):
        local_start = off[first_cell:stop_cell] - off[first_cell]
        shift = np.repeat(cell_start + before[s] - local_start, counts[s])
        positions.append(shift + np.arange(len(shift), dtype=np.int64))
    return positions


def merged_offsets(source_offsets: Sequence[np.ndarray]) -> np.ndarray:
    """Offsets of the cell-by-cell merge of several groupings over the same cells."""
    return np.sum(np.stack(source_offsets), axis=0)


def cell_blocks(offsets: np.ndarray, max_rows: int) -> Iterator[tuple[int, int]]:
    """Consecutive cell ranges [first, stop) of at most max_rows rows each (a bigger cell is
    a range of its own), covering every cell."""
    n_cells = len(offsets) - 1
    first = 0
    while first < n_cells:
        limit = offsets[first] + max_rows
        stop = int(np.searchsorted(offsets, limit, side="right")) - 1
        stop = min(max(stop, first + 1), n_cells)
        yield first, stop
        first = stop
