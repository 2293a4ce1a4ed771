"""Whole evaluations from what a user has on disk (``dpq evaluate``'s two inputs).

- :func:`evaluate_feature_files`: saved query / database / training features (.npy) and an
  index file of the database (a DPQ index or a binary one, :func:`dpq.index.load_any`): the
  named methods at each code length.
- :func:`evaluate_checkpoint`: a trained model of any method with a labelled source and a
  split file: :func:`evaluate_split` (its codes at each of its code lengths, the float
  features, baselines fitted on the split's training rows).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from dpq.evaluate.baselines import BASELINES
from dpq.evaluate.feature_set import FeatureSet
from dpq.evaluate.results import Evaluation, RetrievalEvaluation
from dpq.evaluate.retrieval import evaluate_methods, evaluate_retrieval
from dpq.evaluate.rows import DEFAULT_BITS, baseline_methods, float_method, index_methods

PathLike = str | os.PathLike[str]
FLOAT = "float"
"""The name of exact search over the float features (a reference row)."""


def evaluate_feature_files(
    files: Mapping[str, PathLike | None],
    methods: Sequence[str],
    bits: Sequence[int] = DEFAULT_BITS,
    index: PathLike | None = None,
    metric: str | None = None,
    r: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Evaluation:
    """Score ``methods`` on saved features: each at each code length, mAP@R with timings.

    Args:
        files: .npy paths by the keys of :data:`~dpq.evaluate.retrieval.FEATURE_FILES`
            (``query_features``, ``query_labels``, ``db_labels`` required; ``db_features``
            for baselines and float search; ``train_features`` + ``train_labels`` to fit
            the baselines on, else they are fitted on the database). Never unpickled.
        methods: "float" (exact search, a reference row),
            :data:`~dpq.evaluate.baselines.BASELINES` names, and any other name (a retrieval
            method's, e.g. "dpq" or "sign") for the rows of ``index`` under that name; rows
            in this order, float last.
        bits: code lengths (a DPQ index: multiples of log2 K up to L log2 K; a binary
            index answers at its one length, which must be among them).
        index: an index file of the database (DPQ or binary), items in ``db_labels`` order.
        metric: how float features and quantization baselines rank, "l2" or "ip"; default:
            "ip" when ``index`` is searched by inner product, else "l2".
        r: mAP@R cutoff (default: the whole database).
        seed: seed of every baseline.
        progress: report progress on stderr.
    """
    from dpq.index.kinds import load_any, search_mode

    loaded = None if index is None else load_any(index)
    if metric is None:
        metric = "ip" if loaded is not None and search_mode(loaded) == "ip" else "l2"
    features = FeatureSet.from_files(**files, metric=metric)
    names = list(dict.fromkeys(methods))
    rows = []
    for name in [name for name in names if name not in BASELINES and name != FLOAT]:
        if loaded is None:
            raise ValueError(
                f"method {name!r} needs a DPQ index or a binary index of the database: pass "
                "its file (--index PATH; `dpq encode` writes one)."
            )
        rows += index_methods(loaded, name, bits, len(features.db_labels), features.dim)
    baselines = [name for name in names if name in BASELINES]
    rows += baseline_methods(baselines, bits, features, seed=seed)
    if FLOAT in names:
        rows.append(float_method(features))
    return evaluate_methods(features, rows, r=r, progress=progress)


def evaluate_split(
    model: Any,
    source: Any,
    split: Any,
    baselines: Sequence[str] = (),
    r: int | None = None,
    curves: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> RetrievalEvaluation:
    """A trained model on a split of a source: its query rows searched in its database
    rows (:func:`dpq.evaluate.retrieval.evaluate_retrieval`), baselines fitted on its
    training rows; images read on demand are decoded by ``workers`` processes.

    Args:
        model: a trained network of any method (:func:`dpq.methods.load_network`).
        source: a :class:`~dpq.data.Source` the split indexes.
        split: a :class:`~dpq.data.Split` of it.
        baselines, r, curves, progress, workers: as in ``evaluate_retrieval``.
    """
    rows = {name: split.rows(name, len(source), source.name) for name in ("query", "database")}
    query_inputs, query_labels = source.rows(rows["query"])
    database_inputs, database_labels = source.rows(rows["database"])
    train_inputs = train_labels = None
    if baselines and len(split.train):
        train_inputs, train_labels = source.rows(split.rows("train", len(source), source.name))
    return evaluate_retrieval(
        model,
        query_inputs,
        query_labels,
        database_inputs,
        database_labels,
        r=r,
        baselines=tuple(baselines),
        train_inputs=train_inputs,
        train_labels=train_labels,
        curves=curves,
        progress=progress,
        workers=workers,
    )


def evaluate_checkpoint(
    model_dir: PathLike,
    images: PathLike,
    split: PathLike,
    baselines: Sequence[str] = (),
    r: int | None = None,
    device: str = "auto",
    workers: int | None = None,
    progress: bool = True,
    **source_options: Any,
) -> RetrievalEvaluation:
    """The model of any method saved in ``model_dir``, on ``device``, evaluated on the split file ``split``
    of the source ``images`` (:func:`evaluate_split`, with PR and precision@R curves).

    ``source_options`` go to :func:`dpq.data.load_source` (``image_root``, ``image_size``,
    ``strip_prefix``, ``skip_corrupt``, ``in_memory``, ...). The model is loaded first, so a
    missing GPU is said before the source is decoded.
    """
    from dpq.data import Split, load_source
    from dpq.devices import resolve_device
    from dpq.methods import load_network

    model = load_network(model_dir, device=resolve_device(device))
    loaded_split = Split.load(split)
    source = load_source(images, **source_options, progress=progress)
    return evaluate_split(
        model,
        source,
        loaded_split,
        baselines=baselines,
        r=r,
        curves=True,
        progress=progress,
        workers=workers,
    )
