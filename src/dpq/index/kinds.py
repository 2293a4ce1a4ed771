"""Index files of every kind: which kind a file holds, loading it, and what callers ask of
any index without knowing its kind.

Two kinds of index share the checksummed file of :mod:`dpq.index.storage`, told apart by the
header's ``"kind"``:

- "dpq" (the key is absent in its files): :class:`~dpq.index.DPQIndex`, codebooks and
  additive codes searched by AQD (or inner product) at any prefix of the codes;
- "binary": :class:`~dpq.index.binary.BinaryIndex`, packed binary codes searched by
  Hamming distance (the hashing methods).

:func:`load_any` reads the header, then loads the file with its kind's own ``load``.
numpy and faiss only (no torch).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dpq.index.binary import BinaryIndex, sign_codes
from dpq.index.dpq_index import DPQIndex
from dpq.index.storage import IndexFileError, read_index_file

AnyIndex = DPQIndex | BinaryIndex
KINDS = ("dpq", "binary")
SEARCH_NAMES = {"aqd": "AQD", "ip": "inner-product search", "hamming": "Hamming distance"}
"""How each search mode (:func:`search_mode`) is named in reports."""


def index_kind(path: str | os.PathLike[str]) -> str:
    """The kind of index the file holds ("dpq" or "binary"), from its header (checksum of
    the header checked, the arrays not read).

    Raises:
        FileNotFoundError: no such file.
        IndexFileError: not an index file, or one of a kind this dpq does not know.
    """
    header, _ = read_index_file(path, mmap=True, verify=False)
    kind = header.get("kind", "dpq")
    if kind not in KINDS:
        raise IndexFileError(
            f"{path} holds an index of kind {kind!r}, but this dpq reads {', '.join(KINDS)}; "
            "use the dpq release that wrote it."
        )
    return kind


def load_any(
    path: str | os.PathLike[str], mmap: bool = False, verify: bool = True
) -> DPQIndex | BinaryIndex:
    """The index in the file, whatever its kind (:func:`index_kind`).

    Args:
        path: an index file (``DPQIndex.save`` or ``BinaryIndex.save``).
        mmap: a DPQ index's arrays stay in the file (:meth:`DPQIndex.load`); a binary
            index is read into memory either way.
        verify: check every array's checksum.
    """
    if index_kind(path) == "binary":
        return BinaryIndex.load(path, verify=verify)
    return DPQIndex.load(path, mmap=mmap, verify=verify)


def kind_of(index: AnyIndex) -> str:
    """ "dpq" or "binary"; TypeError for anything else."""
    if isinstance(index, DPQIndex):
        return "dpq"
    if isinstance(index, BinaryIndex):
        return "binary"
    raise TypeError(f"expected a DPQIndex or a BinaryIndex; got {type(index).__name__}.")


def code_lengths(index: AnyIndex) -> tuple[int, ...]:
    """The code lengths in bits the index searches, shortest first: a DPQ index every prefix
    l log2 K (l = 1..L), a binary index its one length."""
    if isinstance(index, BinaryIndex):
        return (index.bits,)
    kind_of(index)  # TypeError for anything but a DPQIndex
    bits_per_level = float(np.log2(index.codebook_size))
    return tuple(int(level * bits_per_level) for level in range(1, index.num_levels + 1))


def search_mode(index: AnyIndex) -> str:
    """How the index ranks: "aqd" or "ip" (a DPQ index's ``search_mode``) or "hamming"."""
    if isinstance(index, DPQIndex):
        return index.search_mode
    kind_of(index)  # TypeError for anything but a BinaryIndex
    return "hamming"


def same_codes(index: AnyIndex, other: AnyIndex) -> bool:
    """Whether codes made for ``other`` mean the same in ``index``: the same kind and the
    same codebooks (DPQ) or code length (binary)."""
    if isinstance(index, DPQIndex) and isinstance(other, DPQIndex):
        return index.codebook_sha256 == other.codebook_sha256
    if isinstance(index, BinaryIndex) and isinstance(other, BinaryIndex):
        return index.bits == other.bits
    kind_of(index), kind_of(other)  # TypeError for anything else
    return False


def check_compatible(index: AnyIndex, other: AnyIndex, source: str = "the model") -> None:
    """ValueError unless codes of ``other`` (e.g. an empty index of the model, from
    ``method.new_index``) can join or search ``index``; ``source`` names ``other``."""
    if isinstance(index, DPQIndex) and isinstance(other, DPQIndex):
        index.check_compatible(other.codebooks, source=source)
    elif isinstance(index, BinaryIndex) and isinstance(other, BinaryIndex):
        if index.bits != other.bits:
            raise ValueError(
                f"{source} makes {other.bits}-bit codes but the index holds {index.bits}-bit "
                "codes; use the model that built the index or rebuild it with `dpq encode`."
            )
    else:
        raise ValueError(
            f"{source} makes {kind_of(other)} codes but the index holds {kind_of(index)} "
            "codes; use the model that built the index or rebuild it with `dpq encode`."
        )


def binary_queries(index: BinaryIndex, queries: Any) -> np.ndarray:
    """The uint8 (nq, bits / 8) query codes of a binary index: packed codes as given, or
    the signs of float (nq, bits) features (:func:`~dpq.index.binary.sign_codes`)."""
    arr = np.asarray(queries)
    if arr.dtype == np.uint8 and arr.ndim == 2 and arr.shape[1] == index.code_bytes:
        return arr
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating) or arr.shape[1] != index.bits:
        raise ValueError(
            f"queries of a {index.bits}-bit binary index are float (nq, {index.bits}) features "
            f"(their signs are the bits) or uint8 (nq, {index.code_bytes}) packed codes; got "
            f"{arr.dtype} {arr.shape}."
        )
    return sign_codes(arr)


def check_search_options(index: AnyIndex, **options: Any) -> None:
    """ValueError when a binary index is given options of a DPQ index's search
    (``num_levels``, ``mode``, ``nprobe``, ...) with a value other than None."""
    given = sorted(name for name, value in options.items() if value is not None)
    if given and not isinstance(index, DPQIndex):
        raise ValueError(
            f"{', '.join(given)} apply to a DPQ index; this index holds {index.bits}-bit binary "
            "codes searched by Hamming distance."
        )


def search_features(
    index: AnyIndex, queries: Any, k: int, method: Any = None, **options: Any
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest items of each query.

    A DPQ index: ``index.search(queries, k, **options)`` (float (nq, D) features; options
    such as ``num_levels``, ``mode``, ``nprobe``). A binary index (options refused,
    :func:`check_search_options`): ``method.search`` with the features of the trained model
    whose method (:class:`~dpq.methods.base.RetrievalMethod`) is given, else Hamming distance
    to :func:`binary_queries`.
    """
    if isinstance(index, DPQIndex):
        return index.search(queries, k, **options)
    check_search_options(index, **options)
    if method is not None:
        return method.search(index, queries, k)
    return index.search(binary_queries(index, queries), k)
