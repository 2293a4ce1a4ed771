"""Retrieval baselines behind one shape: ``fit(x[, labels]) / add(x) / encode(x) / search(q, k)``.

Quantizers (faiss, asymmetric distance: float query vs codes): ``pq``, ``opq``, ``rq``,
``lsq``. Binary hashing (numpy / scikit-learn, Hamming ranking): ``itq``, ``itq-cca``
(supervised), ``lsh``. Every one takes a code length in bits (8, 16, 24, 32, ...)::

    from dpq.evaluate.baselines import make_baseline
    pq = make_baseline("pq", bits=32, seed=0).fit(train_features)
    pq.add(db_features)
    distances, ids = pq.search(query_features, k=100)  # float32 (nq, 100), int64 (nq, 100)

:mod:`dpq.evaluate.retrieval` runs them (and a trained model's index) on one feature set and scores mAP@R
with :mod:`dpq.evaluate.metrics`.
"""

from __future__ import annotations

from typing import Any

from dpq.evaluate.baselines.base import Baseline
from dpq.evaluate.baselines.hashing import ITQ, ITQCCA, LSH, BinaryHash, hamming_distances
from dpq.evaluate.baselines.quantizers import LSQ, OPQ, PQ, RQ, FaissQuantizer

BASELINES: dict[str, type[Baseline]] = {
    cls.name: cls for cls in (PQ, OPQ, RQ, LSQ, ITQ, ITQCCA, LSH)
}


def make_baseline(name: str, bits: int, seed: int = 0, **options: Any) -> Baseline:
    """An unfitted baseline by registry name (see ``BASELINES``) with a code of ``bits`` bits.

    ``options`` go to the class (e.g. ``iterations`` for opq/itq, ``beam_size`` for rq,
    ``train_iterations`` / ``encode_iterations`` for lsq); defaults are the usual settings."""
    try:
        cls = BASELINES[name]
    except KeyError:
        raise ValueError(
            f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}."
        ) from None
    return cls(bits, seed=seed, **options)


__all__ = [
    "BASELINES",
    "Baseline",
    "BinaryHash",
    "FaissQuantizer",
    "ITQ",
    "ITQCCA",
    "LSH",
    "LSQ",
    "OPQ",
    "PQ",
    "RQ",
    "hamming_distances",
    "make_baseline",
]
