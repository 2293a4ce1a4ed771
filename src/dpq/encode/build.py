"""From a trained model and a collection to a searchable index.

:func:`build_index` is the one way items become an index: ``dpq encode``, the evaluation
of a trained model and the search service all call it. It streams the inputs through the
network (:meth:`~dpq.model.retrieval_network.RetrievalNetwork.iter_searched_features`: an
on-demand image reader is decoded by DataLoader worker processes a few batches ahead, so
neither the images nor their features ever have to fit in memory), and asks the network's
method (:func:`dpq.methods.method_for`) for the rest: :data:`CHUNK_ITEMS` features at a time
become codes (``method.encode``) that are added, with the item ids and labels, to the index
the method makes (``method.new_index``: a :class:`~dpq.index.DPQIndex` with the model's
codebooks, assignment rule and search mode for DPQ, a :class:`~dpq.index.binary.BinaryIndex`
for a hashing method).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dpq.index import DPQIndex
from dpq.index.kinds import AnyIndex, check_compatible
from dpq.methods import method_for
from dpq.methods.base import RetrievalMethod
from dpq.model.retrieval_network import RetrievalNetwork
from dpq.progress import progress_bar

CHUNK_ITEMS = 8192
"""Features collected before :func:`build_index` encodes them and adds them to the index."""


def empty_index(
    model: RetrievalNetwork,
    metadata: Mapping[str, Any] | None = None,
    search_mode: str | None = None,
    partition_levels: int = 0,
) -> AnyIndex:
    """The index the model's method makes for its codes (``method.new_index``), with no
    items. A DPQ index (codebooks and assignment rule of the model) is searched by
    ``search_mode`` (default the model's: "ip" for class posteriors, else "aqd") and its
    items grouped by their first ``partition_levels`` codes (0: one cell); these two settings
    apply to DPQ indexes only (ValueError for another kind)."""
    index = method_for(model.config).new_index(model, metadata)
    if search_mode is None and not partition_levels:
        return index
    if not isinstance(index, DPQIndex):
        raise ValueError(
            "search_mode and partition_levels (--search-mode, --partition-levels) apply to a "
            f"DPQ index; the {model.config.method.name!r} method makes a {type(index).__name__}."
        )
    return DPQIndex(
        index.codebooks,
        assignment=index.assignment,
        metadata=index.metadata,
        search_mode=search_mode or index.search_mode,
        partition_levels=partition_levels,
    )


def check_rows(name: str, values: Any, n: int) -> None:
    """ValueError unless ``values`` (when given) has one row per item."""
    if values is not None and len(values) != n:
        raise ValueError(
            f"{name} has {len(values)} rows but there are {n} items; give one per item, in the "
            "same order."
        )


def add_features(
    index: AnyIndex,
    model: RetrievalNetwork,
    features: np.ndarray,
    ids: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    method: RetrievalMethod | None = None,
) -> np.ndarray:
    """Encode searched features float32 (n, D) with the model's method (``method``, default
    :func:`~dpq.methods.method_for` the model's config) and add them to ``index``; returns
    the int64 (n,) ids."""
    check_rows("ids", ids, len(features))
    check_rows("labels", labels, len(features))
    method = method or method_for(model.config)
    return index.add(method.encode(model, features), ids=ids, labels=labels)


def build_index(
    model: RetrievalNetwork,
    inputs: Any,
    ids: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    batch_size: int = 256,
    metadata: Mapping[str, Any] | None = None,
    progress: bool = False,
    index: AnyIndex | None = None,
    search_mode: str | None = None,
    workers: int | None = None,
    precision: str = "fp32",
    partition_levels: int = 0,
) -> AnyIndex:
    """Encode ``inputs`` with ``model`` into an index (a new one, or ``index`` grown).

    Args:
        model: a trained network of any method (:func:`dpq.methods.load_network`).
        inputs: uint8 (N, H, W, 3) images (an array, or an on-demand reader such as
            :class:`dpq.data.ImageFileReader`), or float (N, F) inputs of a feature backbone.
        ids: int64 (N,) item ids (default: the index's counter, 0..N-1 for a new index).
        labels: int64 (N,) or multi-hot (N, C) labels, or None.
        batch_size: inputs per forward pass.
        metadata: JSON-ready metadata of a new index (e.g. model path, source).
        progress: report progress (images/s) on stderr.
        index: an existing index of this model's codes (checked) to add the items to.
        search_mode: how a new DPQ index is searched (default: the model's).
        workers: decoding processes for an on-demand reader (default: one per core, up to
            8; 0: this process); in-memory arrays are read in this process.
        precision: arithmetic of the network ("fp32", "bf16", "fp16"; see
            :meth:`~dpq.model.retrieval_network.RetrievalNetwork.extract_features`).
        partition_levels: a new DPQ index's cells: items grouped by their first 0, 1 or 2 codes
            (searched with ``nprobe``; see :class:`dpq.index.DPQIndex`).

    Returns:
        The index (``index`` itself when given).
    """
    n = len(inputs)
    check_rows("ids", ids, n)
    check_rows("labels", labels, n)
    method = method_for(model.config)
    if index is None:
        index = empty_index(model, metadata, search_mode, partition_levels)
    else:
        check_compatible(index, method.new_index(model), source="the model")
    pending: list[np.ndarray] = []
    pending_start = 0

    def flush(stop: int) -> None:
        nonlocal pending_start
        if not pending:
            return
        add_features(
            index,
            model,
            np.concatenate(pending),
            ids=None if ids is None else ids[pending_start:stop],
            labels=None if labels is None else labels[pending_start:stop],
            method=method,
        )
        pending.clear()
        pending_start = stop

    with progress_bar(n, "encode", "img", enabled=progress) as bar:
        for start, features, _logits in model.iter_searched_features(
            inputs, batch_size=batch_size, precision=precision, workers=workers
        ):
            pending.append(features)
            stop = start + len(features)
            if stop - pending_start >= CHUNK_ITEMS:
                flush(stop)
            bar.update(len(features))
        flush(n)
    return index
