"""The coded database and its search: :class:`DPQIndex` (AQD lookup-table scans at any code
prefix, optionally partitioned by its own first codes), its file format, faiss interop, and
file-level operations for indexes larger than memory; :class:`~dpq.index.binary.BinaryIndex`
(binary codes, Hamming search) in the same file format, and :func:`load_any` for a file of
either kind (:mod:`dpq.index.kinds`).

numpy, numba and faiss only: ``dpq.index`` never imports torch, so a search service needs
neither torch nor a model.
"""

from dpq.index.dpq_index import (
    FORMAT_VERSION,
    MAX_K,
    DPQIndex,
    greedy_residual_encode,
)
from dpq.index.faiss_interop import load_faiss_index, write_faiss_ivf_ondisk
from dpq.index.files import append_to_index_file, merge_index_files
from dpq.index.kinds import load_any
from dpq.index.storage import IndexFileError

__all__ = [
    "DPQIndex",
    "FORMAT_VERSION",
    "IndexFileError",
    "MAX_K",
    "append_to_index_file",
    "greedy_residual_encode",
    "load_any",
    "load_faiss_index",
    "merge_index_files",
    "write_faiss_ivf_ondisk",
]
