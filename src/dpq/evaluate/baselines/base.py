"""The one shape every baseline has: ``fit`` on training features, ``add`` a database,
``encode`` features to codes, ``search`` queries against the added database."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Self

import numpy as np

from dpq.index.checks import check_k

__all__ = ["Baseline", "check_k", "order_ties_by_id"]


class Baseline(ABC):
    """A retrieval baseline with a fixed code length.

    Lifecycle: ``fit(train_features[, train_labels])`` -> ``add(db_features)`` ->
    ``search(queries, k)``. ``encode`` gives the stored codes, uint8 (n, code_size).

    Class attributes:
        name: registry name (``"pq"``, ``"itq"``, ...).
        supervised: whether ``fit`` needs labels.
        search_kind: ``"asymmetric"`` (float query against decoded codes, the AQD of
            quantization methods) or ``"hamming"`` (binary query code against binary codes).
    """

    name: ClassVar[str]
    supervised: ClassVar[bool] = False
    search_kind: ClassVar[str]

    def __init__(self, bits: int, seed: int = 0) -> None:
        bits = int(bits)
        if bits < 1:
            raise ValueError(f"bits must be a positive code length; got {bits}.")
        self.bits = bits
        self.seed = int(seed)
        self.dim: int | None = None

    # -- lifecycle -------------------------------------------------------------------

    @abstractmethod
    def fit(self, features: np.ndarray, labels: np.ndarray | None = None) -> Self:
        """Learn the codebooks / projection from float (n, D) features (labels: int (n,)
        class ids or multi-hot (n, C), used by supervised baselines only). Returns self."""

    @abstractmethod
    def encode(self, features: np.ndarray) -> np.ndarray:
        """Codes of float (n, D) features: uint8 (n, code_size)."""

    @abstractmethod
    def add(self, features: np.ndarray) -> None:
        """Encode float (n, D) database features and append them (ids continue from ntotal)."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest database items of float (nq, D) queries.

        Returns distances float32 (nq, k) ascending and ids int64 (nq, k); equal distances
        are ordered by ascending id; when fewer than k items exist the rest is inf / -1.
        """

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Number of database items added."""

    @property
    @abstractmethod
    def code_size(self) -> int:
        """Bytes stored per database item (may exceed bits / 8, see the subclass)."""

    def describe(self) -> dict[str, Any]:
        """Name, code length and settings, for reports."""
        return {
            "name": self.name,
            "bits": self.bits,
            "search": self.search_kind,
            "code_bytes": self.code_size if self.dim is not None else None,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={self.bits}, seed={self.seed})"

    # -- input checks shared by subclasses ---------------------------------------------

    def _check_fitted(self) -> int:
        if self.dim is None:
            raise ValueError(f"{self.name} is not fitted: call fit(train_features) first.")
        return self.dim

    def _features(self, features: Any, name: str, *, fitting: bool = False) -> np.ndarray:
        """float32 C-contiguous (n, D), checked against the fitted dimension."""
        array = np.asarray(features)
        if array.ndim != 2:
            raise ValueError(f"{name} must be a 2-D array (n, dim); got shape {array.shape}.")
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"{name} must be numbers; got dtype {array.dtype}.")
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"{name} contain NaN or infinite values; clean the features first.")
        if fitting:
            if array.shape[0] < 2:
                raise ValueError(f"{name} needs at least 2 rows to fit; got {array.shape[0]}.")
            return array
        dim = self._check_fitted()
        if array.shape[1] != dim:
            raise ValueError(
                f"{name} have dimension {array.shape[1]} but {self.name} was fitted on dimension "
                f"{dim}; use features from the same extractor."
            )
        return array


def order_ties_by_id(distances: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder each row by (distance, id) where equal distances are not in id order.

    distances float32 (nq, k), ids int64 (nq, k) from a search; -1 padding stays last.
    """
    keys = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    bad_rows = np.flatnonzero(
        ((distances[:, 1:] == distances[:, :-1]) & (keys[:, 1:] < keys[:, :-1])).any(axis=1)
    )
    for row in bad_rows:
        order = np.lexsort((keys[row], distances[row]))
        distances[row] = distances[row, order]
        ids[row] = ids[row, order]
    return distances, ids
