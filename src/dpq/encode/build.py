"""From a trained model and a collection to a searchable :class:`~dpq.index.DPQIndex`.

:func:`build_index` is the one way items become an index: ``dpq encode``, the evaluation
of a trained model and the search service all call it. It streams the inputs through the
model (:meth:`dpq.model.network.DPQModel.iter_searched_features`: an on-demand image reader is
decoded by DataLoader worker processes a few batches ahead, so neither the images nor their
features ever have to fit in memory), encodes :data:`CHUNK_ITEMS` features at a time with
the model's quantizer and adds the codes, with the item ids and labels, to an index that
carries the model's codebooks, assignment rule and search mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dpq.index import DPQIndex
from dpq.model.network import DPQModel
from dpq.progress import progress_bar

CHUNK_ITEMS = 8192
"""Features collected before :func:`build_index` encodes them and adds them to the index."""


def empty_index(
    model: DPQModel,
    metadata: Mapping[str, Any] | None = None,
    search_mode: str | None = None,
    partition_levels: int = 0,
) -> DPQIndex:
    """An index with the model's codebooks and assignment rule, and no items; searched by
    ``search_mode`` (default the model's: "ip" for class posteriors, else "aqd"), its items
    grouped by their first ``partition_levels`` codes (0: one cell)."""
    return DPQIndex(
        model.codebooks(),
        assignment=model.config.quantizer.assignment,
        metadata=metadata,
        search_mode=search_mode or model.config.model.search_mode,
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
    index: DPQIndex,
    model: DPQModel,
    features: np.ndarray,
    ids: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Encode searched features float32 (n, D) with the model's quantizer and add them to
    ``index``; returns the int64 (n,) ids."""
    check_rows("ids", ids, len(features))
    check_rows("labels", labels, len(features))
    return index.add(model.encode_features(features), ids=ids, labels=labels)


def build_index(
    model: DPQModel,
    inputs: Any,
    ids: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    batch_size: int = 256,
    metadata: Mapping[str, Any] | None = None,
    progress: bool = False,
    index: DPQIndex | None = None,
    search_mode: str | None = None,
    workers: int | None = None,
    precision: str = "fp32",
    partition_levels: int = 0,
) -> DPQIndex:
    """Encode ``inputs`` with ``model`` into an index (a new one, or ``index`` grown).

    Args:
        model: a trained model.
        inputs: uint8 (N, H, W, 3) images (an array, or an on-demand reader such as
            :class:`dpq.data.ImageFileReader`), or float (N, F) inputs of a feature backbone.
        ids: int64 (N,) item ids (default: the index's counter, 0..N-1 for a new index).
        labels: int64 (N,) or multi-hot (N, C) labels, or None.
        batch_size: inputs per forward pass.
        metadata: JSON-ready metadata of a new index (e.g. model path, source).
        progress: report progress (images/s) on stderr.
        index: an existing index of this model's codebooks to add the items to.
        search_mode: how a new index is searched (default: the model's).
        workers: decoding processes for an on-demand reader (default: one per core, up to
            8; 0: this process); in-memory arrays are read in this process.
        precision: arithmetic of the network ("fp32", "bf16", "fp16"; see
            :meth:`dpq.model.network.DPQModel.extract_features`).
        partition_levels: a new index's cells: items grouped by their first 0, 1 or 2 codes
            (searched with ``nprobe``; see :class:`dpq.index.DPQIndex`).

    Returns:
        The index (``index`` itself when given).
    """
    n = len(inputs)
    check_rows("ids", ids, n)
    check_rows("labels", labels, n)
    if index is None:
        index = empty_index(model, metadata, search_mode, partition_levels)
    else:
        index.check_compatible(model.codebooks(), source="the model")
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
