"""DPQIndex: coded database + Asymmetric Quantization Distance (AQD) search with lookup tables.

The facade users know, over three parts: a :class:`~dpq.index.store.CodeStore` (codes,
ids, labels, norms and cells), the search strategies of :mod:`dpq.index.search` (full
scan, probed cells, re-rank; settings in one :class:`~dpq.index.search.SearchParameters`)
and the file format of :mod:`dpq.index.storage`. numpy, numba and faiss only: this module
never imports torch, so a search service needs neither torch nor a model.

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

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dpq.index import faiss_interop
from dpq.index import search as searching
from dpq.index.checks import MAX_K, check_k, check_num_levels
from dpq.index.codebooks import (
    ASSIGNMENTS,
    check_codebooks,
    codebooks_sha256,
    decode,
    greedy_residual_encode,
)
from dpq.index.search import SEARCH_MODES, SearchParameters
from dpq.index.storage import FORMAT_VERSION, IndexFileError, read_index_file, write_index_file
from dpq.index.store import CodeStore

__all__ = ["DPQIndex", "IndexFileError", "greedy_residual_encode", "FORMAT_VERSION", "MAX_K"]


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
        books = check_codebooks(codebooks)
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
        self._store = CodeStore(books, partition_levels)

    # ---- properties ------------------------------------------------------------------------

    @property
    def store(self) -> CodeStore:
        """The code store underneath (storage order; see :mod:`dpq.index.store`)."""
        return self._store

    @property
    def num_levels(self) -> int:
        """L, the number of codes per item."""
        return self._store.num_levels

    @property
    def codebook_size(self) -> int:
        """K, the number of codewords per level."""
        return self._store.codebook_size

    @property
    def dim(self) -> int:
        """D, the dimension of features and queries."""
        return self._store.dim

    @property
    def ntotal(self) -> int:
        """Number of items in the index."""
        return self._store.ntotal

    def __len__(self) -> int:
        return self.ntotal

    @property
    def codebooks(self) -> np.ndarray:
        """float32 (L, K, D), read-only."""
        return self._store.codebooks

    @property
    def codes(self) -> np.ndarray:
        """Codes (N, L), uint8 or uint16 (a read-only view of the stored rows, index order)."""
        self._store.group()
        view = self._store.codes[:, : self.num_levels]
        view.flags.writeable = False
        return view

    @property
    def ids(self) -> np.ndarray:
        """int64 (N,) item ids, in index order (read-only view)."""
        self._store.group()
        view = self._store.ids.view()
        view.flags.writeable = False
        return view

    @property
    def labels(self) -> np.ndarray | None:
        """Item labels in index order: int64 (N,) or multi-hot uint8 (N, C); None if not given."""
        self._store.group()
        return self._store.labels

    @property
    def label_shape(self) -> tuple[int, ...] | None:
        """Shape of one item's label: () for class ids, (C,) for multi-hot; None without."""
        labels = self._store.labels
        return None if labels is None else tuple(labels.shape[1:])

    @property
    def codebook_sha256(self) -> str:
        """sha256 of the float32 little-endian codebook bytes; identifies the model's codebooks."""
        return codebooks_sha256(self.codebooks)

    @property
    def partition_levels(self) -> int:
        """p: items are grouped into K^p cells by their first p codes (0: one cell)."""
        return self._store.partition_levels

    @property
    def cell_offsets(self) -> np.ndarray:
        """int64 (K^p + 1,): cell c (its first p codes, first most significant) holds the
        items at positions offsets[c]:offsets[c + 1] of the index order (read-only)."""
        self._store.group()
        view = self._store.offsets.view()
        view.flags.writeable = False
        return view

    @property
    def read_only(self) -> bool:
        """True for an index memory-mapped from a file (``load(..., mmap=True)``)."""
        return self._store.mapped_from is not None

    @property
    def next_id(self) -> int:
        """The id :meth:`add` gives the next item when no ids are passed."""
        return self._store.next_id

    @property
    def ungrouped(self) -> int:
        """Items added since the cells were last regrouped (a partitioned index's tail, which
        a search with nprobe scans in full); 0 for an unpartitioned index."""
        return self._store.ungrouped

    def bytes_per_item(self, num_levels: int | None = None) -> int:
        """Memory per item that a search at this prefix reads: the stored code row (uint8 rows
        are padded to a multiple of 4 bytes) plus a float32 norm when num_levels > 1 (a
        one-level search folds the norm into its table). Ids (8 bytes) not included."""
        levels = check_num_levels(num_levels, self.num_levels, self.codebook_size)
        norm_bytes = 0 if levels == 1 else 4
        return self._store.code_width * self._store.code_dtype.itemsize + norm_bytes

    def memory_bytes(self) -> int:
        """Bytes of codes, norms (all cached prefixes), ids, labels and cell offsets
        (arrays memory-mapped from a file count with their full size)."""
        return self._store.nbytes()

    def __repr__(self) -> str:
        return (
            f"DPQIndex(ntotal={self.ntotal}, num_levels={self.num_levels}, "
            f"codebook_size={self.codebook_size}, dim={self.dim}, assignment={self.assignment!r}, "
            f"search_mode={self.search_mode!r}, partition_levels={self.partition_levels})"
        )

    # ---- cells -------------------------------------------------------------------------------

    def group_added(self, only_if_large: bool = False) -> None:
        """Merge the items added since the last grouping into their cells (one O(N) pass;
        every read that needs index order does it too). ``only_if_large``: only when they
        have outgrown what a search scans beside the probed cells (N/64), as a search does.

        Reads never change the index otherwise, so a program that searches from several
        threads while another adds calls this after each write, under its write lock."""
        self._store.group_added(only_if_large)

    def repartition(self, partition_levels: int) -> None:
        """Regroup all items by their first ``partition_levels`` codes (0, 1 or 2)."""
        self._store.repartition(partition_levels)

    # ---- adding, removing, reading by id -------------------------------------------------------

    def reserve(self, ntotal: int) -> None:
        """Make room for ``ntotal`` items so adds up to that size never copy the arrays
        (optional: without it capacity grows by 1.5x when needed)."""
        self._store.reserve(ntotal)

    def add(self, codes: Any, ids: Any = None, labels: Any = None) -> np.ndarray:
        """Append coded items; amortised O(items added), memory grows geometrically.

        codes: integer (N, L) in 0..K-1; ids: int64 (N,) unique, >= 0 (default: continue
        a counter); labels: int64 (N,) or multi-hot (N, C). Returns the int64 (N,) ids.
        In a partitioned index the items join their cells at the next read.
        """
        return self._store.append(codes, ids=ids, labels=labels)

    def encode(self, features: Any, num_levels: int | None = None) -> np.ndarray:
        """Codes (N, num_levels) of float (N, D) features with this index's assignment rule."""
        return greedy_residual_encode(features, self.codebooks, self.assignment, num_levels)

    def decode(self, codes: Any) -> np.ndarray:
        """float32 (N, D) reconstructions of codes (N, l), l <= L (a prefix decodes too)."""
        arr = np.asarray(codes)
        if arr.ndim != 2 or not 1 <= arr.shape[1] <= self.num_levels:
            raise ValueError(
                f"codes must have shape (N, l) with 1 <= l <= {self.num_levels}; got {arr.shape}."
            )
        padded = np.zeros((arr.shape[0], self.num_levels), dtype=np.int64)
        padded[:, : arr.shape[1]] = arr
        self._store.check_codes(padded)
        return decode(arr, self.codebooks)

    def add_features(self, features: Any, ids: Any = None, labels: Any = None) -> np.ndarray:
        """Encode float (N, D) features (greedy residual, see :func:`greedy_residual_encode`)
        and add them. Returns the int64 (N,) ids."""
        return self.add(self.encode(features), ids=ids, labels=labels)

    def remove(self, ids: Any) -> int:
        """Remove the items with these ids (unknown ids are ignored). Returns how many went.
        The other items keep their order (and cells)."""
        return self._store.remove(ids)

    def contains(self, ids: Any) -> np.ndarray:
        """bool array of the shape of ``ids``: which ids are in the index."""
        arr = np.asarray(ids, dtype=np.int64)
        return self._store.rows_of(arr.ravel())[1].reshape(arr.shape)

    def codes_of(self, ids: Any) -> np.ndarray:
        """Codes (n, L) of the items with these n ids, in that order; ValueError naming the
        first id that is not in the index."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        rows, found = self._store.rows_of(arr)
        if not found.all():
            raise ValueError(f"id {int(arr[~found][0])} is not in the index.")
        return self._store.codes[rows, : self.num_levels].copy()

    def labels_of(self, ids: Any) -> np.ndarray:
        """Labels of items by id, any shape of ids (e.g. search results (nq, k)).

        Single labels: int64, -1 where the id is -1 or unknown. Multi-hot: (..., C), all
        zeros there. Raises ValueError if the index has no labels.
        """
        if not self._store.has_labels:
            raise ValueError("this index has no labels; build it with labels to look them up.")
        stored = self._store.labels  # rows in storage order, as rows_of gives them
        arr = np.asarray(ids, dtype=np.int64)
        rows, found = self._store.rows_of(arr.ravel())
        if self.ntotal:
            out = stored[np.maximum(rows, 0)].copy()
        else:
            out = np.zeros((rows.size, *stored.shape[1:]), stored.dtype)
        out[~found] = -1 if stored.ndim == 1 else 0
        return out.reshape(*arr.shape, *stored.shape[1:])

    # ---- search -------------------------------------------------------------------------------

    def search(
        self,
        queries: Any,
        k: int,
        num_levels: int | None = None,
        mode: Literal["aqd", "ip"] | None = None,
        rerank_from: int | None = None,
        rerank_candidates: int | None = None,
        nprobe: int | None = None,
        *,
        params: SearchParameters | None = None,
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
        the number of cells gives exactly the results of a full scan. params: all of these
        (and a thread limit) in one :class:`~dpq.index.search.SearchParameters`, instead of
        the separate keywords.

        k: 1..MAX_K. Returns distances float32 (nq, w) ascending and ids int64 (nq, w) with
        w = min(k, ntotal); where fewer than w items are reachable (nprobe) the rest is
        inf / -1. Ties are ordered by position in the index.
        """
        k = check_k(k)
        settings = (num_levels, mode, rerank_from, rerank_candidates, nprobe)
        if params is None:
            params = SearchParameters(
                num_levels=num_levels,
                mode=mode,
                nprobe=nprobe,
                rerank_from=rerank_from,
                rerank_candidates=rerank_candidates,
            )
        elif any(value is not None for value in settings):
            raise ValueError(
                "pass the search settings either in params or as keywords, not both; "
                "e.g. dataclasses.replace(params, nprobe=8)."
            )
        resolved = params.for_store(self._store, self.search_mode)
        q = searching.check_queries(queries, self.dim)
        return searching.search(self._store, q, k, resolved)

    # ---- compatibility ----------------------------------------------------------------------

    def check_compatible(self, codebooks: Any, source: str = "the model") -> None:
        """Raise ValueError unless ``codebooks`` (L, K, D) equal this index's codebooks."""
        books = check_codebooks(codebooks)
        if books.shape != self.codebooks.shape:
            raise ValueError(
                f"{source} has codebooks of shape {books.shape} but the index was built with "
                f"{self.codebooks.shape}; use the model that built the index or re-encode."
            )
        if codebooks_sha256(books) != self.codebook_sha256:
            raise ValueError(
                f"{source}'s codebooks differ from the ones this index was built with "
                f"(sha256 {codebooks_sha256(books)[:12]} vs {self.codebook_sha256[:12]}); "
                "its codes would be meaningless for these queries. Use the same model checkpoint "
                "or rebuild the index with `dpq encode`."
            )

    # ---- persistence ------------------------------------------------------------------------

    def file_header(
        self, ntotal: int | None = None, next_id: int | None = None, **changes: Any
    ) -> dict[str, Any]:
        """The JSON header of a file holding this index (see :mod:`dpq.index.storage`); with
        the overrides, of a file made from it by appending or merging (e.g. metadata=...)."""
        header = {
            "num_levels": self.num_levels,
            "codebook_size": self.codebook_size,
            "dim": self.dim,
            "ntotal": self.ntotal if ntotal is None else int(ntotal),
            "assignment": self.assignment,
            "search_mode": self.search_mode,
            "codebook_sha256": self.codebook_sha256,
            "next_id": self.next_id if next_id is None else int(next_id),
            "has_labels": self._store.has_labels,
            "metadata": self.metadata,
            "partition_levels": self.partition_levels,
            "code_width": self._store.code_width,
        }
        header.update(changes)
        return header

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the index to one .npz file (no pickle, uncompressed), atomically.

        Holds codebooks, codes (N, W), ids, norms, cell offsets (partitioned), optional
        labels and a JSON header with the config, format version and sha256 digests (see
        :mod:`dpq.index.storage`); its arrays can be memory-mapped by ``load(mmap=True)``.
        Returns the path.
        """
        arrays = {"codebooks": self.codebooks, **self._store.file_columns()}
        if self.partition_levels:
            arrays["offsets"] = self._store.offsets
        return write_index_file(path, self.file_header(), arrays)

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
            if index.codebooks.shape != tuple(expected):
                raise ValueError(f"codebooks shape {index.codebooks.shape} != header {expected}")
            if header["format_version"] == 1:
                index.add(arrays["codes"], ids=arrays["ids"], labels=arrays.get("labels"))
            else:
                has_labels = bool(header.get("has_labels", False))
                mapped = str(source) if mmap else None
                index._store.attach(arrays, int(header["ntotal"]), has_labels, mapped)
            if index.ntotal != header["ntotal"]:
                raise ValueError(f"{index.ntotal} items but the header says {header['ntotal']}")
            index._store.advance_next_id(int(header.get("next_id", 0)))
        except (ValueError, KeyError, TypeError) as exc:
            raise IndexFileError(f"{source} holds an inconsistent index: {exc}") from None
        return index

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
        mode = self.search_mode if mode is None else mode
        if ivf:
            return faiss_interop.to_faiss_ivf(self._store, mode)
        return faiss_interop.to_faiss_flat(self._store, mode)

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
        contents = faiss_interop.read_faiss(index)
        out = cls(
            contents.codebooks,
            assignment=assignment,
            metadata=metadata,
            search_mode=contents.search_mode,
            partition_levels=contents.partition_levels,
        )
        if len(contents.codes):
            out.add(contents.codes, ids=contents.ids)
        return out
