"""Retrieval evaluation: every method is a searcher, scored the same way.

:func:`evaluate_methods` runs a list of rows (:mod:`dpq.evaluate.rows`: a method at one code
length and the searcher it builds) over one :class:`~dpq.evaluate.feature_set.FeatureSet`:
each searches the same queries in the same database with k = R, and the rankings go to
:func:`dpq.evaluate.metrics.average_precision_at_r` in query batches, so a 1,000 x 54,000
evaluation needs a few hundred MB, not gigabytes.

:func:`evaluate_retrieval` is the evaluation of a trained model of any method: its features,
its codes at each of its code lengths (encoded and indexed by its method, searched by its
own distance), the float features, optional baselines fitted on the training features, and
the classifier's accuracy where it has one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from dpq.evaluate.feature_set import FeatureSet
from dpq.evaluate.metrics import (
    PRCurve,
    average_precision_at_r,
    default_cutoffs,
    pr_curve,
    precision_at,
    rank_by_distance,
)
from dpq.evaluate.results import Evaluation, MethodResult, RetrievalEvaluation
from dpq.evaluate.rows import Method, Searcher, baseline_methods, float_method, method_rows
from dpq.progress import progress_bar

DEFAULT_PRECISION_RANKS: tuple[int, ...] = tuple(range(100, 1001, 100))
# Elements of a (query batch x k) search result kept at once (distances + ids).
_RESULT_ELEMENTS = 1 << 24


class _Scorer:
    """Accumulates per-query AP (and curves) over query batches of a ranking."""

    def __init__(self, features: FeatureSet, r: int, with_curves: bool, ranks: Sequence[int]):
        self.features, self.r, self.with_curves, self.ranks = features, r, with_curves, list(ranks)
        n_queries = features.query_labels.shape[0]
        self.ap = np.zeros(n_queries, dtype=np.float64)
        self.cutoffs = default_cutoffs(r)
        self.pr_precision = np.zeros(self.cutoffs.size)
        self.pr_recall = np.zeros(self.cutoffs.size)
        self.at_r = np.zeros(len(self.ranks))
        self.batch = max(1, _RESULT_ELEMENTS // r)

    def score(self, start: int, ids: np.ndarray) -> None:
        stop = start + ids.shape[0]
        labels = self.features.query_labels[start:stop]
        self.ap[start:stop] = average_precision_at_r(ids, labels, self.features.db_labels, self.r)
        if self.with_curves:
            weight = ids.shape[0] / self.ap.size
            curve = pr_curve(ids, labels, self.features.db_labels, cutoffs=self.cutoffs)
            self.pr_precision += weight * curve.precision
            self.pr_recall += weight * curve.recall
            self.at_r += weight * precision_at(ids, labels, self.features.db_labels, self.ranks)

    def curves(self) -> dict[str, Any]:
        if not self.with_curves:
            return {}
        return {
            "pr": PRCurve(self.cutoffs, self.pr_precision, self.pr_recall),
            "precision_at": {
                "ranks": [int(rank) for rank in self.ranks],
                "precision": [float(p) for p in self.at_r],
            },
        }


def _search_and_score(
    searcher: Searcher, features: FeatureSet, r: int, with_curves: bool, ranks: Sequence[int]
) -> tuple[_Scorer, float]:
    """Run the searcher in query batches; returns the scorer and the seconds spent
    searching (scoring excluded)."""
    scorer = _Scorer(features, r, with_curves, ranks)
    queries = features.query_features
    seconds = 0.0
    for start in range(0, queries.shape[0], scorer.batch):
        began = time.perf_counter()
        _, ids = searcher.search(queries[start : start + scorer.batch], r)
        seconds += time.perf_counter() - began
        scorer.score(start, ids)
    return scorer, seconds


def evaluate_methods(
    features: FeatureSet,
    methods: Sequence[Method],
    r: int | None = None,
    curve_bits: Sequence[int] = (32,),
    precision_ranks: Sequence[int] = DEFAULT_PRECISION_RANKS,
    progress: bool = True,
) -> Evaluation:
    """Prepare, search and score each method.

    Args:
        features: the feature set (see :class:`FeatureSet`).
        methods: the rows (:mod:`dpq.evaluate.rows`: :func:`~dpq.evaluate.rows.index_methods`,
            :func:`~dpq.evaluate.rows.baseline_methods`, :func:`~dpq.evaluate.rows.float_method`).
        r: mAP@R cutoff; default: the whole database. Clamped to the database size.
        curve_bits: code lengths at which PR and precision@R curves are computed (reference
            rows: never).
        precision_ranks: cutoffs of the precision@R curve (kept where <= R).
        progress: report progress on stderr.

    Returns:
        An :class:`Evaluation`.
    """
    methods = list(methods)
    if not methods:
        raise ValueError("no method to evaluate: name at least one method or baseline.")
    n_database = int(features.db_labels.shape[0])
    notes: list[str] = []
    r_used = n_database if r is None else int(r)
    if r_used < 1:
        raise ValueError(f"r must be at least 1; got {r}.")
    if r_used > n_database:
        notes.append(f"R = {r_used} is larger than the database; used R = {n_database}.")
        r_used = n_database
    ranks = [rank for rank in precision_ranks if rank <= r_used] or [r_used]
    fitted_on = None
    if any(method.fits for method in methods):
        fit_features, _, fitted_on = features.fitting_data()
        if fitted_on == "database":
            notes.append(
                "No training features given: baselines were fitted on the database features."
            )
        from dpq.evaluate.baselines.quantizers import CODEWORDS, FAISS_POINTS_PER_CENTROID

        suggested = CODEWORDS * FAISS_POINTS_PER_CENTROID
        if len(fit_features) < suggested:
            notes.append(
                f"The baselines' k-means saw {len(fit_features):,} training rows for "
                f"{CODEWORDS} codewords, fewer than the {suggested:,} faiss suggests; their "
                "codebooks are fitted on what the protocol gives them."
            )
    results: list[MethodResult] = []
    with progress_bar(len(methods), "evaluate", "run", enabled=progress) as bar:
        for method in methods:
            bar.set_postfix_str(f"{method.name} {method.bits} bits")
            prepared = method.prepare()
            with_curves = method.bits in curve_bits and not method.reference
            scorer, search_seconds = _search_and_score(
                prepared.searcher, features, r_used, with_curves, ranks
            )
            results.append(
                MethodResult(
                    method=method.name,
                    bits=method.bits,
                    map=float(scorer.ap.mean()),
                    fit_seconds=prepared.fit_seconds,
                    encode_seconds=prepared.encode_seconds,
                    search_seconds=search_seconds,
                    n_queries=scorer.ap.size,
                    n_database=n_database,
                    settings=prepared.settings,
                    reference=method.reference,
                    **scorer.curves(),
                )
            )
            bar.update(1)
    return Evaluation(
        results=results,
        r=r_used,
        r_requested=r,
        fitted_on=fitted_on,
        n_queries=int(features.query_labels.shape[0]),
        n_database=n_database,
        notes=notes,
    )


# ---------------------------------------------------------------------------- a trained model


def evaluate_retrieval(
    model: Any,
    query_inputs: np.ndarray,
    query_labels: np.ndarray,
    database_inputs: np.ndarray,
    database_labels: np.ndarray,
    r: int | None = None,
    float_baseline: bool = True,
    baselines: Sequence[str] = (),
    train_inputs: np.ndarray | None = None,
    train_labels: np.ndarray | None = None,
    curves: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> RetrievalEvaluation:
    """A trained model on a query set and a database: features, codes at each of its code
    lengths, exact float search and optional baselines, scored with mAP@R.

    The model's method (:func:`dpq.methods.method_for`) encodes the database into its index
    (``method.encode``, ``method.new_index``) and searches it (``method.search``) at each of
    ``method.code_lengths()``: a DPQ model at every prefix by AQD (or inner product), a
    hashing method at its one length by Hamming distance.

    Args:
        model: a trained network of any method (:func:`dpq.methods.load_network`).
        query_inputs, database_inputs: uint8 (N, H, W, 3) images or float (N, F) features.
        query_labels, database_labels: int64 (N,) or multi-hot (N, C).
        r: R of mAP@R (default: the whole database).
        float_baseline: also score exact search over the float features.
        baselines: names of :data:`dpq.evaluate.baselines.BASELINES` fitted on the training
            features, at the model's code lengths.
        train_inputs, train_labels: the training set, for fitting the baselines.
        curves: compute PR and precision@R curves at the longest code.
        progress: report progress on stderr.
        workers: decoding processes for images read on demand (see
            :meth:`dpq.model.retrieval_network.RetrievalNetwork.extract_features`).
    """
    from dpq.index.kinds import SEARCH_NAMES, search_mode
    from dpq.methods import method_for

    method = method_for(model.config)
    seconds: dict[str, float] = {}
    begin = time.perf_counter()
    query_features, query_logits = model.extract_features_and_logits(query_inputs, workers=workers)
    database_features, database_logits = model.extract_features_and_logits(
        database_inputs, progress=progress, workers=workers
    )
    train_features = None
    if baselines and train_inputs is not None:
        train_features = model.extract_features(train_inputs, progress=progress, workers=workers)
    seconds["features"] = time.perf_counter() - begin

    begin = time.perf_counter()
    index = method.new_index(model)
    index.add(method.encode(model, database_features))
    seconds["encode"] = time.perf_counter() - begin

    mode = search_mode(index)
    features = FeatureSet(
        query_features=query_features,
        query_labels=np.asarray(query_labels),
        db_labels=np.asarray(database_labels),
        db_features=database_features,
        train_features=train_features,
        train_labels=None if train_features is None else np.asarray(train_labels),
        metric="ip" if mode == "ip" else "l2",
    )
    methods = method_rows(method, index, encode_seconds=seconds["encode"])
    bits = [row.bits for row in methods]
    methods += baseline_methods(baselines, bits, features)
    if float_baseline:
        methods.append(float_method(features))
    begin = time.perf_counter()
    details = evaluate_methods(
        features, methods, r=r, curve_bits=(bits[-1],) if curves else (), progress=progress
    )
    seconds["search"] = time.perf_counter() - begin
    return RetrievalEvaluation(
        map_by_bits=dict(details.map_table()[method.name]),
        r=details.r,
        float_map=details.float_reference(),
        seconds={k: round(v, 2) for k, v in seconds.items()},
        num_queries=len(query_labels),
        num_database=len(database_labels),
        details=details,
        method=method.name,
        search=SEARCH_NAMES[mode],
        **classifier_diagnostics(
            query_logits, database_logits, query_labels, database_labels, details.r
        ),
    )


def classifier_diagnostics(
    query_logits: np.ndarray,
    database_logits: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    r: int,
) -> dict[str, float | None]:
    """``query_accuracy``, ``database_accuracy`` and ``class_probability_map`` of a model's
    classifier (float (n, C) logits; single-label data), all None without a classifier
    (C = 0) or with multi-label data."""
    if np.asarray(query_labels).ndim != 1 or np.shape(query_logits)[1] == 0:
        return {"query_accuracy": None, "database_accuracy": None, "class_probability_map": None}
    return {
        "query_accuracy": float((query_logits.argmax(1) == np.asarray(query_labels)).mean()),
        "database_accuracy": float(
            (database_logits.argmax(1) == np.asarray(database_labels)).mean()
        ),
        "class_probability_map": class_probability_map(
            query_logits, database_logits, query_labels, database_labels, r
        ),
    }


def class_probability_map(
    query_logits: np.ndarray,
    database_logits: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    r: int,
    chunk: int = 64,
) -> float:
    """mAP@R of ranking the database by the L2 distance between softmax probabilities.

    The ranking a fully class-collapsed embedding of the same classifier would give (items
    of the query's predicted class first, the most confident first): a diagnostic that
    separates what the classifier's accuracy allows from how tightly the features gather.

    Args:
        query_logits, database_logits: float (nq, C) and (N, C) classifier logits.
        query_labels, database_labels: int64 (nq,) and (N,) class ids.
        r: R of mAP@R (<= N).
        chunk: queries ranked at a time (memory: chunk x N distances).
    """

    def probabilities(logits: np.ndarray) -> np.ndarray:
        shifted = np.asarray(logits, np.float64)
        shifted = np.exp(shifted - shifted.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    query_p, database_p = probabilities(query_logits), probabilities(database_logits)
    database_sq = (database_p**2).sum(axis=1)
    precisions = []
    for start in range(0, len(query_p), chunk):
        block = query_p[start : start + chunk]
        distances = (block**2).sum(axis=1)[:, None] - 2.0 * block @ database_p.T + database_sq
        ranked = rank_by_distance(distances, k=r)
        precisions.append(
            average_precision_at_r(
                ranked, np.asarray(query_labels)[start : start + chunk], database_labels, r
            )
        )
    return float(np.concatenate(precisions).mean())
