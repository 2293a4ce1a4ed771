"""Per-item arrays of an index in one row order, grown geometrically. numpy only."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# Capacity grows by this factor when appended items do not fit (amortised O(1) per item).
GROWTH = 1.5


class Rows:
    """Per-item arrays sharing one row order ("codes", "ids", "labels", "norms:<l>"), with
    spare capacity so that appending m items costs O(m) amortised (capacity grows by
    GROWTH, or :meth:`reserve` sets it); reads are views of the first ``size`` rows.
    Arrays given by :meth:`attach` (e.g. memory-mapped from a file) are used as they are."""

    def __init__(self) -> None:
        self._data: dict[str, np.ndarray] = {}
        self.size = 0
        self.capacity_hint = 0  # rows to allocate at the first append (reserve on no columns)

    def __contains__(self, name: str) -> bool:
        return name in self._data

    def names(self) -> list[str]:
        return list(self._data)

    def get(self, name: str) -> np.ndarray:
        return self._data[name][: self.size]

    def capacity(self, name: str) -> int:
        """Rows allocated for this column (0 when it does not exist)."""
        return self._data[name].shape[0] if name in self._data else 0

    def nbytes(self) -> int:
        return sum(self.get(name).nbytes for name in self._data)

    def attach(self, arrays: Mapping[str, np.ndarray], size: int) -> None:
        """Use these (size, ...) arrays as the storage, without copying."""
        self._data = dict(arrays)
        self.size = size

    def set_column(self, name: str, values: np.ndarray) -> None:
        """Add or replace one column of exactly ``size`` rows (e.g. a cached norm)."""
        self._data[name] = values

    def clear(self) -> None:
        """Drop every column (the capacity hint stays)."""
        self._data = {}
        self.size = 0

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` rows in every column (never shrinks); without columns
        yet, the first append allocates that much."""
        self.capacity_hint = max(self.capacity_hint, int(capacity))
        for name, arr in self._data.items():
            if arr.shape[0] < capacity:
                grown = np.empty((capacity, *arr.shape[1:]), arr.dtype)
                grown[: self.size] = arr[: self.size]
                self._data[name] = grown

    def append(self, rows: Mapping[str, np.ndarray]) -> None:
        """Append the same number of rows to every column (names must match)."""
        n = len(next(iter(rows.values())))
        if not self._data:
            capacity = max(n, self.capacity_hint)
            for name, values in rows.items():
                self._data[name] = np.empty((capacity, *values.shape[1:]), values.dtype)
                self._data[name][:n] = values
            self.size = n
            return
        needed = self.size + n
        capacity = min(arr.shape[0] for arr in self._data.values())
        if needed > capacity:
            self.reserve(max(needed, int(capacity * GROWTH), 1024))
        for name, values in rows.items():
            self._data[name][self.size : needed] = values
        self.size = needed

    def take(self, rows: np.ndarray) -> None:
        """Keep only rows[i] (int64 positions or a bool mask), in that order, in every column."""
        for name in self._data:
            self._data[name] = self.get(name)[rows]
        self.size = len(next(iter(self._data.values()))) if self._data else 0
