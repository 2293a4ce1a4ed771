"""Binary codes searched by Hamming distance: the index of hashing methods (sign codes).

:class:`BinaryIndex` keeps codes of ``bits`` bits packed into uint8 (N, bits / 8) (as
``np.packbits`` packs them), with int64 ids and optional labels, and searches them with
faiss's ``IndexBinaryFlat`` (exhaustive Hamming distance). Equal distances are ordered by
ascending id (with the default ids, the order items were added: the tie rule of
:mod:`dpq.evaluate.metrics`). Its file is the checksummed index file of
:mod:`dpq.index.storage`, with ``"kind": "binary"`` in the header.

numpy and faiss only (no torch).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dpq.index.checks import check_ids
from dpq.index.rows import Rows
from dpq.index.storage import IndexFileError, read_index_file, write_index_file

KIND = "binary"
"""The header's ``kind`` of a binary index file."""
MISSING_DISTANCE = np.iinfo(np.int32).max
"""Distance reported where fewer than k items exist (faiss's value)."""


def sign_codes(features: Any) -> np.ndarray:
    """The packed signs of float (N, bits) features: uint8 (N, bits / 8), bit b of an item
    1 where its feature b is > 0 (``np.packbits`` order): the codes of a hashing method's
    real-valued outputs (e.g. tanh), and the queries of a search by those outputs."""
    arr = np.asarray(features)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating) or arr.shape[1] % 8:
        raise ValueError(
            f"features must be float (N, bits) with bits a multiple of 8; got {arr.dtype} "
            f"{arr.shape}."
        )
    return np.packbits(arr > 0, axis=1)


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or bits < 8 or bits % 8:
        raise ValueError(f"bits must be a positive multiple of 8 (e.g. 32); got {bits!r}.")
    return int(bits)


class BinaryIndex:
    """Packed binary codes with ids and labels, searched by Hamming distance.

    Args:
        bits: code length, a positive multiple of 8; a code is uint8 (bits / 8,).
        metadata: JSON-ready dict saved with the index (e.g. the model it came from).
    """

    def __init__(self, bits: int, metadata: Mapping[str, Any] | None = None) -> None:
        import faiss

        self.bits = _check_bits(bits)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._faiss = faiss.IndexBinaryFlat(self.bits)
        self._rows = Rows()
        self._has_labels = False
        self._next_id = 0

    @property
    def code_bytes(self) -> int:
        """Bytes of one code (bits / 8)."""
        return self.bits // 8

    @property
    def ntotal(self) -> int:
        return self._rows.size

    def __len__(self) -> int:
        return self.ntotal

    @property
    def codes(self) -> np.ndarray:
        """uint8 (N, bits / 8), in the order items were added."""
        return self._column("codes", (0, self.code_bytes), np.uint8)

    @property
    def ids(self) -> np.ndarray:
        """int64 (N,)."""
        return self._column("ids", (0,), np.int64)

    @property
    def labels(self) -> np.ndarray | None:
        """int64 (N,) or uint8 (N, C) multi-hot, or None when the index has no labels."""
        return self._rows.get("labels") if self._has_labels else None

    def __repr__(self) -> str:
        return f"BinaryIndex(bits={self.bits}, ntotal={self.ntotal})"

    def labels_of(self, ids: Any) -> np.ndarray:
        """Labels of items by id, any shape of ids (e.g. search results (nq, k)).

        Single labels: int64, -1 where the id is -1 or unknown. Multi-hot: (..., C), all
        zeros there. Raises ValueError if the index has no labels.
        """
        labels = self.labels
        if labels is None:
            raise ValueError("this index has no labels; build it with labels to look them up.")
        wanted = np.asarray(ids, dtype=np.int64)
        flat = wanted.ravel()
        order = np.argsort(self.ids, kind="stable")  # an index with labels has items
        known = self.ids[order]
        rows = order[np.minimum(np.searchsorted(known, flat), len(known) - 1)]
        found = self.ids[rows] == flat
        if labels.ndim == 1:
            return np.where(found, labels[rows], -1).astype(np.int64).reshape(wanted.shape)
        picked = labels[rows] * found[:, None].astype(labels.dtype)
        return picked.reshape(*wanted.shape, labels.shape[1])

    def _column(self, name: str, empty: tuple[int, ...], dtype: type) -> np.ndarray:
        return self._rows.get(name) if name in self._rows else np.empty(empty, dtype)

    # ------------------------------------------------------------------ adding

    def _check_codes(self, codes: Any, what: str = "codes") -> np.ndarray:
        arr = np.asarray(codes)
        if arr.ndim != 2 or arr.shape[1] != self.code_bytes or arr.dtype != np.uint8:
            raise ValueError(
                f"{what} must be uint8 of shape (N, {self.code_bytes}) ({self.bits} bits packed "
                f"by np.packbits); got {arr.dtype} {arr.shape}."
            )
        return np.ascontiguousarray(arr)

    def _check_ids(self, ids: Any, n: int) -> np.ndarray:
        if ids is None:
            return np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        arr = check_ids(ids, n)
        if np.isin(arr, self.ids).any():
            raise ValueError("ids must be unique and not yet in the index; give other ids.")
        return arr

    def _check_labels(self, labels: Any, n: int) -> np.ndarray | None:
        if labels is None:
            if self._has_labels and self.ntotal:
                raise ValueError("this index has labels: pass labels for the new items too.")
            return None
        if self.ntotal and not self._has_labels:
            raise ValueError("this index was built without labels: cannot add labelled items.")
        arr = np.asarray(labels)
        if arr.ndim not in (1, 2) or arr.shape[0] != n:
            raise ValueError(
                f"labels must be (N,) class ids or (N, C) multi-hot with N={n}; got {arr.shape}."
            )
        if arr.ndim == 1 and n and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"single labels must be integers; got dtype {arr.dtype}.")
        arr = arr.astype(np.int64 if arr.ndim == 1 else np.uint8)
        stored = self.labels
        if stored is not None and self.ntotal and stored.shape[1:] != arr.shape[1:]:
            raise ValueError(
                f"labels must be {stored.shape[1:]} per item as in the index; got {arr.shape[1:]}."
            )
        return arr

    def add(self, codes: Any, ids: Any = None, labels: Any = None) -> np.ndarray:
        """Append items.

        Args:
            codes: uint8 (N, bits / 8) packed codes.
            ids: int64 (N,) unique ids >= 0 (default: continue a counter).
            labels: int64 (N,) class ids or (N, C) multi-hot, for every item or none.

        Returns:
            int64 (N,) the items' ids.
        """
        arr = self._check_codes(codes)
        n = len(arr)
        new_ids = self._check_ids(ids, n)
        new_labels = self._check_labels(labels, n)
        if n == 0:
            return new_ids
        if self.ntotal == 0:
            self._has_labels = new_labels is not None
        columns = {"codes": arr, "ids": new_ids}
        if new_labels is not None:
            columns["labels"] = new_labels
        self._rows.append(columns)
        self._faiss.add(arr)
        self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        return new_ids

    # ------------------------------------------------------------------ search

    def search(self, query_codes: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest items of each query by Hamming distance.

        Args:
            query_codes: uint8 (nq, bits / 8) packed codes.
            k: results per query, >= 1.

        Returns:
            distances int32 (nq, k) ascending and ids int64 (nq, k); equal distances by
            ascending id; where the index holds fewer than k items, the rest is
            :data:`MISSING_DISTANCE` / -1.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer; got {k!r}.")
        queries = self._check_codes(query_codes, "query codes")
        nq, k = len(queries), int(k)
        out_d = np.full((nq, k), MISSING_DISTANCE, np.int32)
        out_i = np.full((nq, k), -1, np.int64)
        width = min(k, self.ntotal)
        if nq == 0 or width == 0:
            return out_d, out_i
        distances, _ = self._faiss.search(queries, width)
        # faiss's order among equal distances is its own: every item up to each query's
        # width-th distance is fetched again and ordered by (distance, id)
        kth = distances[:, width - 1]
        for value in np.unique(kth):
            group = np.flatnonzero(kth == value)
            lims, dist, rows = self._faiss.range_search(queries[group], int(value) + 1)
            counts = np.diff(lims).astype(np.int64)
            query = np.repeat(np.arange(len(group)), counts)
            ids = self.ids[rows]
            order = np.lexsort((ids, dist, query))
            rank = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
            keep = rank < width
            chosen = order[keep]
            out_d[group[query[chosen]], rank[keep]] = dist[chosen].astype(np.int32)
            out_i[group[query[chosen]], rank[keep]] = ids[chosen]
        return out_d, out_i

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the index to one checksummed file (:func:`dpq.index.storage.write_index_file`),
        atomically; returns the path."""
        header = {
            "kind": KIND,
            "bits": self.bits,
            "ntotal": self.ntotal,
            "next_id": self._next_id,
            "has_labels": self._has_labels,
            "metadata": self.metadata,
        }
        arrays = {"codes": self.codes, "ids": self.ids}
        if self.labels is not None:
            arrays["labels"] = self.labels
        return write_index_file(path, header, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str], verify: bool = True) -> BinaryIndex:
        """Read a file written by :meth:`save` (checksums verified unless ``verify`` is false).

        Raises:
            FileNotFoundError: no such file.
            IndexFileError: a damaged file, or an index of another kind.
        """
        header, arrays = read_index_file(path, verify=verify)
        if header.get("kind") != KIND:
            raise IndexFileError(
                f"{path} holds a {header.get('kind', 'dpq')!r} index, not a binary one; load "
                "it with dpq.index.DPQIndex.load."
            )
        try:
            index = cls(header["bits"], header.get("metadata"))
            labels = arrays.get("labels") if header.get("has_labels") else None
            index.add(arrays["codes"], ids=arrays["ids"], labels=labels)
            if index.ntotal != header["ntotal"]:
                raise ValueError(f"{index.ntotal} items but the header says {header['ntotal']}")
            index._next_id = max(index._next_id, int(header.get("next_id", 0)))
        except (ValueError, KeyError, TypeError) as exc:
            raise IndexFileError(f"{path} holds an inconsistent binary index: {exc}") from None
        return index
