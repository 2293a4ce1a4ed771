"""From a trained model and a collection to a searchable index.

:func:`build_index` is the one way items become an index: ``dpq encode``, the evaluation
of a trained model and the search service all call it. It streams the inputs through the
network in an inference engine (:mod:`dpq.inference`: the model itself in eager torch by
default, or its ONNX export in ONNX Runtime or OpenVINO; an on-demand image reader is
decoded by DataLoader worker processes a few batches ahead, so neither the images nor their
features ever have to fit in memory), timing each stage (:mod:`dpq.encode.stages`), and
asks the network's method (:func:`dpq.methods.method_for`) for the rest: :data:`CHUNK_ITEMS`
features at a time become codes (``method.encode``) that are added, with the item ids and
labels, to the index the method makes (``method.new_index``: a :class:`~dpq.index.DPQIndex`
with the model's codebooks, assignment rule and search mode for DPQ, a
:class:`~dpq.index.binary.BinaryIndex` for a hashing method).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dpq.data.loading import BatchReader
from dpq.encode.stages import StageTimes
from dpq.index import DPQIndex
from dpq.index.kinds import AnyIndex, check_compatible
from dpq.inference.engines import FeatureEngine, TorchEngine
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
    engine: FeatureEngine | None = None,
    stages: StageTimes | None = None,
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
        engine: who runs the network (:func:`dpq.inference.engine_for`: ONNX Runtime,
            OpenVINO); default the model itself in torch at ``precision``. Its batch size
            replaces ``batch_size``.
        stages: where the seconds of the "decode", "network" and "codes" stages and the
            item count are added (:class:`~dpq.encode.stages.StageTimes`).

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
    model.check_inputs(inputs)
    if engine is None:
        engine = TorchEngine(model, batch_size, precision=precision)
    elif engine.feature_dim != model.feature_dim or engine.input_kind != model.input_kind:
        raise ValueError(
            f"the {engine.name} engine computes {engine.feature_dim}-dim features of "
            f"{engine.input_kind}, but the model {model.feature_dim}-dim features of "
            f"{model.input_kind}; open the engine for this model's checkpoint."
        )
    stages = stages if stages is not None else StageTimes()
    pending: list[np.ndarray] = []
    pending_start = 0

    def flush(stop: int) -> None:
        nonlocal pending_start
        if not pending:
            return
        with stages.stage("codes"):
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

    with (
        progress_bar(n, "encode", "img", enabled=progress) as bar,
        BatchReader(inputs, workers=workers) as reader,
    ):
        batches = reader.sequential(engine.batch_size)
        while True:
            with stages.stage("decode"):
                start, batch = next(batches, (n, None))
            if batch is None:
                break
            with stages.stage("network"):
                features = engine.features(batch.numpy())
            pending.append(features)
            stop = start + len(features)
            if stop - pending_start >= CHUNK_ITEMS:
                flush(stop)
            bar.update(len(features))
        flush(n)
    stages.items += n
    return index
