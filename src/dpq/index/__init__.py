"""The coded database and its search: :class:`DPQIndex` (AQD lookup-table scans at any code
prefix, optionally partitioned by its own first codes), its file format, faiss interop, and
file-level operations for indexes larger than memory; :class:`~dpq.index.binary.BinaryIndex`
(binary codes, Hamming search) in the same file format, and :func:`load_any` for a file of
either kind (:mod:`dpq.index.kinds`).

The parts under the facade: :mod:`~dpq.index.store` (:class:`CodeStore`: codes, ids,
labels, norms, cells), :mod:`~dpq.index.search` (:class:`SearchParameters`, the full scan,
probed cells and re-rank strategies), :mod:`~dpq.index.kernels` (the numba scans),
:mod:`~dpq.index.codebooks` (encoding and decoding), :mod:`~dpq.index.checks`
(:func:`check_k`, shared with every searcher), :mod:`~dpq.index.storage` (the file),
:mod:`~dpq.index.files` and :mod:`~dpq.index.faiss_interop`.

numpy, numba and faiss only: ``dpq.index`` never imports torch, so a search service needs
neither torch nor a model. Each name below is loaded on first use, so importing
``dpq.index.checks`` alone needs numpy alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CodeStore": "dpq.index.store",
    "DPQIndex": "dpq.index.dpq_index",
    "FORMAT_VERSION": "dpq.index.storage",
    "IndexFileError": "dpq.index.storage",
    "MAX_K": "dpq.index.checks",
    "SearchParameters": "dpq.index.search",
    "append_to_index_file": "dpq.index.files",
    "check_k": "dpq.index.checks",
    "greedy_residual_encode": "dpq.index.codebooks",
    "load_any": "dpq.index.kinds",
    "load_faiss_index": "dpq.index.faiss_interop",
    "merge_index_files": "dpq.index.files",
    "write_faiss_ivf_ondisk": "dpq.index.faiss_interop",
}

if TYPE_CHECKING:  # pragma: no cover
    from dpq.index.checks import MAX_K, check_k
    from dpq.index.codebooks import greedy_residual_encode
    from dpq.index.dpq_index import DPQIndex
    from dpq.index.faiss_interop import load_faiss_index, write_faiss_ivf_ondisk
    from dpq.index.files import append_to_index_file, merge_index_files
    from dpq.index.kinds import load_any
    from dpq.index.search import SearchParameters
    from dpq.index.storage import FORMAT_VERSION, IndexFileError
    from dpq.index.store import CodeStore

__all__ = [  # noqa: F822 - the names are loaded lazily by __getattr__
    "CodeStore",
    "DPQIndex",
    "FORMAT_VERSION",
    "IndexFileError",
    "MAX_K",
    "SearchParameters",
    "append_to_index_file",
    "check_k",
    "greedy_residual_encode",
    "load_any",
    "load_faiss_index",
    "merge_index_files",
    "write_faiss_ivf_ondisk",
]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'dpq.index' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
