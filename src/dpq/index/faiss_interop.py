"""faiss views of a code store without re-encoding, and back; on-disk faiss IVF indexes.

A DPQ code is a residual-quantizer code, so faiss holds it as it is:

- flat: ``IndexResidualQuantizer`` (L levels of b = log2 K bits) with the codebooks copied
  in and the codes packed by ``rq.pack_codes``;
- IVF: ``IndexIVFResidualQuantizer`` (by residual) whose coarse quantizer holds the first
  p codebooks (``IndexFlat`` of the level-1 codewords for p = 1; a
  ``ResidualCoarseQuantizer`` over levels 1..2 searched exhaustively for p = 2) and whose
  residual quantizer holds levels p+1..L. Each item goes to the list of its first p codes
  with its remaining codes (and, for L2, the norm of their reconstruction), so faiss ranks
  lists and items exactly as :meth:`DPQIndex.search` does with ``nprobe``.

For indexes larger than memory :func:`write_faiss_ivf_ondisk` writes the IVF lists with
faiss's on-disk inverted lists (``faiss.contrib.ondisk.merge_ondisk``, the way
clip-retrieval / autofaiss serve LAION) and :func:`load_faiss_index` maps them
(``IO_FLAG_MMAP``).

Exports read a :class:`~dpq.index.store.CodeStore` (a DPQIndex's ``store``) through its
public methods; imports return the pieces (:class:`FaissContents`) that
``DPQIndex.from_faiss`` builds an index from. numpy and faiss only.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dpq.index import kernels
from dpq.index.search import SEARCH_MODES
from dpq.index.storage import IndexFileError
from dpq.index.store import CodeStore


class StoredIndex(Protocol):
    """What :func:`write_faiss_ivf_ondisk` reads from an index (a DPQIndex is one)."""

    @property
    def store(self) -> CodeStore: ...

    @property
    def search_mode(self) -> str: ...


@dataclass(frozen=True)
class FaissContents:
    """What a faiss residual-quantizer index holds, in DPQ's terms: codebooks float32
    (L, K, D), codes int64 (N, L), ids int64 (N,) (None: 0..N-1), the search mode its
    metric stands for, and partition_levels (its coarse levels, 0 for a flat index)."""

    codebooks: np.ndarray
    codes: np.ndarray
    ids: np.ndarray | None
    search_mode: str
    partition_levels: int


# Items per temporary shard when writing an on-disk IVF index.
_ONDISK_SHARD_ITEMS = 1 << 20


def _nbits(store: CodeStore) -> int:
    nbits = int(round(math.log2(store.codebook_size)))
    if 2**nbits != store.codebook_size or not 1 <= nbits <= 16:
        raise ValueError(
            "faiss residual quantizers need codebook_size a power of 2 up to 65536; got "
            f"{store.codebook_size}."
        )
    return nbits


def _metric(mode: str):
    import faiss

    if mode not in SEARCH_MODES:
        raise ValueError(f"mode must be one of {SEARCH_MODES}; got {mode!r}.")
    if mode == "aqd":
        return faiss.METRIC_L2, faiss.AdditiveQuantizer.ST_norm_float
    return faiss.METRIC_INNER_PRODUCT, faiss.AdditiveQuantizer.ST_LUT_nonorm


def _pack(rq: Any, codes: np.ndarray, norms: np.ndarray | None) -> np.ndarray:
    """uint8 (n, rq.code_size) faiss codes of codes (n, M), with float norms (n,) if given."""
    import faiss

    n = codes.shape[0]
    packed = np.zeros((n, rq.code_size), dtype=np.uint8)
    if n:
        codes32 = np.ascontiguousarray(codes, dtype=np.int32)
        if norms is None:
            rq.pack_codes(n, faiss.swig_ptr(codes32), faiss.swig_ptr(packed), -1)
        else:
            norms = np.ascontiguousarray(norms, dtype=np.float32)
            rq.pack_codes(
                n, faiss.swig_ptr(codes32), faiss.swig_ptr(packed), -1, faiss.swig_ptr(norms)
            )
    return packed


def _unpack(packed: np.ndarray, levels: int, nbits: int) -> np.ndarray:
    """int64 (n, levels) codes from faiss's packed bit strings (n, bytes), lowest bit first."""
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : levels * nbits]
    weights = (1 << np.arange(nbits, dtype=np.int64))[None, None, :]
    return (bits.reshape(len(packed), levels, nbits).astype(np.int64) * weights).sum(axis=2)


def _residual_norms(store: CodeStore, codes: np.ndarray, first_level: int) -> np.ndarray:
    """float32 (n,) squared norms of the reconstructions of levels first_level..L-1."""
    books = np.ascontiguousarray(store.codebooks[first_level:])
    rest = np.ascontiguousarray(codes[:, first_level:])
    return kernels.compute_prefix_norms(rest, books, [books.shape[0]])[0]


# ------------------------------------------------------------------ flat


def to_faiss_flat(store: CodeStore, mode: str):
    """faiss IndexResidualQuantizer with the store's codebooks and codes (see module doc),
    items in index order (groups the store's tail)."""
    import faiss

    nbits = _nbits(store)
    metric, search_type = _metric(mode)
    out = faiss.IndexResidualQuantizer(store.dim, store.num_levels, nbits, metric, search_type)
    faiss.copy_array_to_vector(store.codebooks.ravel(), out.rq.codebooks)
    out.rq.is_trained = True
    out.is_trained = True
    store.group()
    n, ids = store.ntotal, store.ids
    target = out
    if not np.array_equal(ids, np.arange(n)):  # keep the ids: wrap before adding
        target = faiss.IndexIDMap2(out)
        target.own_fields = True
        out.this.disown()  # now owned (and freed) by the wrapper
    if n:
        norms = store.norms(store.num_levels) if mode == "aqd" else None
        packed = _pack(out.rq, store.codes[:, : store.num_levels], norms)
        if target is out:
            out.add_sa_codes(packed)
        else:
            target.add_sa_codes(packed, np.ascontiguousarray(ids))
    return target


# ------------------------------------------------------------------ IVF


def _ivf_shell(store: CodeStore, mode: str, levels: int):
    """An empty, trained IndexIVFResidualQuantizer for coarse levels 1..levels."""
    import faiss

    nbits = _nbits(store)
    if store.num_levels - levels < 1:
        raise ValueError(
            f"a faiss IVF index needs at least one level after the {levels} coarse level(s); "
            f"this index has num_levels={store.num_levels}. Use partition_levels="
            f"{store.num_levels - 1} or the flat to_faiss()."
        )
    metric, search_type = _metric(mode)
    books = store.codebooks
    if levels == 1:
        quantizer = faiss.IndexFlat(store.dim, metric)
        quantizer.add(np.ascontiguousarray(books[0]))
    else:
        quantizer = faiss.ResidualCoarseQuantizer(store.dim, levels, nbits, metric)
        faiss.copy_array_to_vector(
            np.ascontiguousarray(books[:levels]).ravel(), quantizer.rq.codebooks
        )
        quantizer.rq.is_trained = True
        quantizer.is_trained = True
        quantizer.ntotal = store.codebook_size**levels
        quantizer.set_beam_factor(-1.0)  # exhaustive: every prefix reconstruction is a centroid
    nlist = store.codebook_size**levels
    ivf = faiss.IndexIVFResidualQuantizer(
        quantizer, store.dim, nlist, store.num_levels - levels, nbits, metric, search_type
    )
    ivf.own_fields = True
    quantizer.this.disown()  # owned (and freed) by the IVF index
    faiss.copy_array_to_vector(np.ascontiguousarray(books[levels:]).ravel(), ivf.rq.codebooks)
    ivf.rq.is_trained = True
    ivf.is_trained = True
    ivf.by_residual = True
    return ivf


def _ivf_add(ivf, store: CodeStore, mode: str, levels: int, start: int, stop: int) -> None:
    """Add rows start..stop-1 of a grouped store to ivf as codes (no re-encoding)."""
    codes = np.asarray(store.codes[start:stop, : store.num_levels], dtype=np.int64)
    n = codes.shape[0]
    if not n:
        return
    norms = _residual_norms(store, codes, levels) if mode == "aqd" else None
    fine = _pack(ivf.rq, codes[:, levels:], norms)
    # faiss numbers the lists of a residual coarse quantizer lowest level first
    lists = np.zeros(n, np.int64)
    for level in range(levels - 1, -1, -1):
        lists = lists * store.codebook_size + codes[:, level]
    coarse_size = ivf.coarse_code_size()
    sa = np.empty((n, coarse_size + ivf.code_size), np.uint8)
    sa[:, :coarse_size] = lists.astype("<u8").view(np.uint8).reshape(n, 8)[:, :coarse_size]
    sa[:, coarse_size:] = fine
    ivf.add_sa_codes(sa, np.ascontiguousarray(store.ids[start:stop]))


def _ivf_levels(store: CodeStore) -> int:
    return max(1, store.partition_levels)


def to_faiss_ivf(store: CodeStore, mode: str):
    """faiss IndexIVFResidualQuantizer holding the store's items (see module doc)."""
    levels = _ivf_levels(store)
    ivf = _ivf_shell(store, mode, levels)
    store.group()
    _ivf_add(ivf, store, mode, levels, 0, store.ntotal)
    return ivf


def write_faiss_ivf_ondisk(
    index: StoredIndex, path: str | os.PathLike[str], mode: str | None = None
) -> Path:
    """Write ``index`` as a faiss IVF index with on-disk inverted lists; returns the path.

    Writes ``path`` (the faiss index) and, beside it, ``<name>.<token>.ivfdata`` (the lists,
    named uniquely so a reader of an older version keeps its own data); older
    ``<name>.*.ivfdata`` files are removed once the new index is in place. Items go through
    shards of 2^20, so memory stays bounded (a memory-mapped DPQIndex works). Read it with
    :func:`load_faiss_index`; search it with faiss (``faiss.extract_index_ivf(i).nprobe``)
    or turn it back into a DPQIndex with ``DPQIndex.from_faiss``.
    """
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = index.search_mode if mode is None else mode
    store = index.store
    levels = _ivf_levels(store)
    store.group()
    data_path = target.parent / f"{target.name}.{uuid.uuid4().hex[:12]}.ivfdata"
    try:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
            shards = []
            for start in range(0, store.ntotal, _ONDISK_SHARD_ITEMS):
                shard = _ivf_shell(store, mode, levels)
                _ivf_add(shard, store, mode, levels, start, start + _ONDISK_SHARD_ITEMS)
                shards.append(str(Path(tmp) / f"shard{len(shards)}.faiss"))
                faiss.write_index(shard, shards[-1])
                del shard
            trained = _ivf_shell(store, mode, levels)
            merge_ondisk(trained, shards, str(data_path))
            staged = Path(tmp) / "index.faiss"
            faiss.write_index(trained, str(staged))
            os.replace(staged, target)
    except BaseException:
        data_path.unlink(missing_ok=True)
        raise
    for old in target.parent.glob(f"{target.name}.*.ivfdata"):
        if old != data_path:
            old.unlink(missing_ok=True)
    return target


def _has_ondisk_lists(source: Path) -> bool:
    """Whether a faiss index file keeps its inverted lists in a separate on-disk file.

    Reads the file with IO_FLAG_SKIP_IVF_DATA, which reads no list data: faiss accepts that
    for on-disk lists (and for indexes without lists) but refuses in-file array lists."""
    import faiss

    try:
        faiss.read_index(str(source), faiss.IO_FLAG_SKIP_IVF_DATA)
    except RuntimeError as exc:
        if "ArrayInvertedLists" in str(exc):
            return False
        raise
    return True


def load_faiss_index(path: str | os.PathLike[str], mmap: bool = True):
    """Read a faiss index file, its inverted lists memory-mapped when mmap=True.

    The two layouts clip-retrieval serves: on-disk inverted lists (a ``.ivfdata`` file, as
    :func:`write_faiss_ivf_ondisk` or ``merge_ondisk`` write them) are looked up beside the
    index file (``IO_FLAG_ONDISK_SAME_DIR``, so the pair can be moved together) and faiss
    maps them; lists inside the index file are mapped with ``IO_FLAG_MMAP |
    IO_FLAG_READ_ONLY``. mmap=False reads in-file lists into memory. Raises
    FileNotFoundError if absent, IndexFileError (a ValueError) if faiss cannot read it."""
    import faiss

    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"faiss index file not found: {source}")
    try:
        if _has_ondisk_lists(source):
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR
        else:
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        return faiss.read_index(str(source), flags)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        raise IndexFileError(
            f"{source} is not a readable faiss index: {lines[-1] if lines else exc!r}"
        ) from None


# ------------------------------------------------------------------ back to DPQ


def _list_contents(ivf) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(list numbers int64 (n,), ids int64 (n,), codes uint8 (n, code_size)) of all lists."""
    from faiss.contrib.inspect_tools import get_invlist

    lists, ids, codes = [], [], []
    invlists = ivf.invlists
    for list_no in range(ivf.nlist):
        if invlists.list_size(list_no) == 0:
            continue
        list_ids, list_codes = get_invlist(invlists, list_no)
        lists.append(np.full(len(list_ids), list_no, np.int64))
        ids.append(np.asarray(list_ids, np.int64))
        codes.append(np.asarray(list_codes, np.uint8).reshape(len(list_ids), ivf.code_size))
    if not lists:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, ivf.code_size), np.uint8)
    return np.concatenate(lists), np.concatenate(ids), np.concatenate(codes)


def _rq_books(rq, dim: int) -> tuple[np.ndarray, int]:
    import faiss

    nbits = faiss.vector_to_array(rq.nbits)
    if len(nbits) and not np.all(nbits == nbits[0]):
        raise ValueError(
            f"from_faiss needs every level to have the same bits; got {nbits.tolist()}."
        )
    if not rq.is_trained:
        raise ValueError("the faiss index is not trained: it has no codebooks yet.")
    bits = int(nbits[0])
    return faiss.vector_to_array(rq.codebooks).reshape(int(rq.M), 2**bits, dim), bits


def read_faiss(index: Any) -> FaissContents:
    """The codebooks, codes and ids of a faiss residual-quantizer index (see
    ``DPQIndex.from_faiss`` for the kinds it reads); ValueError for any other kind."""
    import faiss

    ids = None
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexIDMap | faiss.IndexIDMap2):
        ids = faiss.vector_to_array(base.id_map).astype(np.int64)
        base = faiss.downcast_index(base.index)
    mode = "ip" if base.metric_type == faiss.METRIC_INNER_PRODUCT else "aqd"
    if isinstance(base, faiss.IndexResidualQuantizer):
        books, bits = _rq_books(base.rq, base.d)
        n = int(base.ntotal)
        raw = faiss.vector_to_array(base.codes).reshape(n, base.code_size)
        codes = _unpack(raw, books.shape[0], bits)
        return FaissContents(books, codes, ids, mode, 0)
    if isinstance(base, faiss.IndexIVFResidualQuantizer):
        fine_books, bits = _rq_books(base.rq, base.d)
        quantizer = faiss.downcast_index(base.quantizer)
        if isinstance(quantizer, faiss.IndexFlat):
            coarse = faiss.rev_swig_ptr(quantizer.get_xb(), quantizer.ntotal * base.d)
            coarse_books = np.array(coarse, np.float32).reshape(1, quantizer.ntotal, base.d)
        elif isinstance(quantizer, faiss.ResidualCoarseQuantizer):
            coarse_books, _ = _rq_books(quantizer.rq, base.d)
        else:
            raise ValueError(
                "from_faiss reads IVF indexes whose coarse quantizer is an IndexFlat or a "
                f"ResidualCoarseQuantizer; got {type(quantizer).__name__}."
            )
        if coarse_books.shape[1:] != fine_books.shape[1:]:
            raise ValueError(
                f"the coarse quantizer has {coarse_books.shape[1]} centroids per level but the "
                f"residual quantizer {fine_books.shape[1]}; it is not a DPQ export."
            )
        books = np.concatenate([coarse_books, fine_books])
        levels, k = coarse_books.shape[0], books.shape[1]
        lists, list_ids, raw = _list_contents(base)
        codes = np.empty((len(lists), books.shape[0]), np.int64)
        rest = lists.copy()
        for level in range(levels):  # lowest level first
            codes[:, level] = rest % k
            rest //= k
        codes[:, levels:] = _unpack(raw, fine_books.shape[0], bits)
        return FaissContents(books, codes, list_ids, mode, min(levels, 2))
    raise ValueError(
        "from_faiss reads an IndexResidualQuantizer (optionally in an IndexIDMap) or an "
        f"IndexIVFResidualQuantizer; got {type(base).__name__}."
    )
