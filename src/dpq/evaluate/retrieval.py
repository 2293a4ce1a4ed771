"""Retrieval evaluation: every method is a *searcher*, scored the same way.

A searcher is anything with ``search(queries, k) -> (distances, ids)`` (float32 (nq, k),
int64 (nq, k), ascending, ``-1`` for missing): a :class:`~dpq.index.DPQIndex` at a prefix
length, exact float search, every baseline of :mod:`dpq.evaluate.baselines`. A :class:`Method` names
one row of a results table (a name and a code length) and knows how to build its searcher
(fitting and encoding, timed). :func:`evaluate_methods` runs a list of methods over one
:class:`FeatureSet`: each searches the same queries in the same database with k = R, and
the rankings go to :func:`dpq.evaluate.metrics.average_precision_at_r` in query batches, so a
1,000 x 54,000 evaluation needs a few hundred MB, not gigabytes.

:func:`evaluate_retrieval` is the evaluation of a trained model: its features, its codes at
every prefix (built with :func:`dpq.encode.build.add_features`), the float features, optional
baselines fitted on the training features, and the classifier's accuracy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dpq.evaluate.baselines import make_baseline
from dpq.evaluate.metrics import (
    PRCurve,
    average_precision_at_r,
    default_cutoffs,
    pr_curve,
    precision_at,
    rank_by_distance,
)
from dpq.progress import progress_bar

DEFAULT_BITS: tuple[int, ...] = (8, 16, 24, 32)
DEFAULT_PRECISION_RANKS: tuple[int, ...] = tuple(range(100, 1001, 100))
METRICS = ("l2", "ip")
FEATURE_FILES = {
    "query_features": "query_features.npy",
    "query_labels": "query_labels.npy",
    "db_features": "db_features.npy",
    "db_labels": "db_labels.npy",
    "train_features": "train_features.npy",
    "train_labels": "train_labels.npy",
}
# Elements of a (query batch x k) search result kept at once (distances + ids).
_RESULT_ELEMENTS = 1 << 24


class Searcher(Protocol):
    """Ranks a database for queries: float (nq, D) -> (float32 (nq, k), int64 (nq, k))."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


# ---------------------------------------------------------------------------- features


@dataclass(frozen=True)
class FeatureSet:
    """Query / database / (optional) training features with their labels.

    Features are float (n, D); labels int (n,) class ids or multi-hot (n, C). Database
    features may be None when only a DPQ index (which holds its own codes) is evaluated.
    ``metric`` is how the features compare: "l2" (squared Euclidean, the default) or "ip"
    (inner product, larger is closer: class-posterior features); it decides how exact float
    search and the quantization baselines rank (the hashing baselines rank by Hamming
    distance either way; a DPQ index ranks by its own ``search_mode``).
    """

    query_features: np.ndarray
    query_labels: np.ndarray
    db_labels: np.ndarray
    db_features: np.ndarray | None = None
    train_features: np.ndarray | None = None
    train_labels: np.ndarray | None = None
    metric: str = "l2"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}; got {self.metric!r}.")
        _check_pair(self.query_features, self.query_labels, "query")
        if self.db_features is not None:
            _check_pair(self.db_features, self.db_labels, "database")
            _check_same_dim(self.query_features, self.db_features, "database")
        if (self.train_features is None) != (self.train_labels is None):
            raise ValueError(
                "give training features and training labels together (or neither, to fit "
                "the baselines on the database)."
            )
        if self.train_features is not None:
            _check_pair(self.train_features, self.train_labels, "training")
            _check_same_dim(self.query_features, self.train_features, "training")
        if np.ndim(self.query_labels) != np.ndim(self.db_labels):
            raise ValueError(
                "query and database labels must be of the same kind (both class ids or both "
                f"multi-hot); got shapes {np.shape(self.query_labels)} and "
                f"{np.shape(self.db_labels)}."
            )

    @classmethod
    def from_files(
        cls,
        *,
        query_features: str | Path,
        query_labels: str | Path,
        db_labels: str | Path,
        db_features: str | Path | None = None,
        train_features: str | Path | None = None,
        train_labels: str | Path | None = None,
        metric: str = "l2",
    ) -> FeatureSet:
        """Load .npy files (:func:`dpq.data.read_array`: never unpickled)."""
        from dpq.data import read_array

        paths = {
            "query_features": query_features,
            "query_labels": query_labels,
            "db_labels": db_labels,
            "db_features": db_features,
            "train_features": train_features,
            "train_labels": train_labels,
        }
        arrays = {
            key: None if path is None else read_array(path, key.replace("_", " "))
            for key, path in paths.items()
        }
        return cls(**arrays, metric=metric)

    @classmethod
    def from_directory(cls, directory: str | Path, metric: str = "l2") -> FeatureSet:
        """Load ``query_features.npy``, ``query_labels.npy``, ``db_features.npy``,
        ``db_labels.npy`` and, if present, ``train_features.npy`` + ``train_labels.npy``."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"features directory not found: {directory}")
        paths: dict[str, Path | None] = {}
        for key, filename in FEATURE_FILES.items():
            path = directory / filename
            required = key in ("query_features", "query_labels", "db_labels")
            if not path.is_file() and required:
                raise FileNotFoundError(
                    f"{directory} lacks {filename}; a features directory holds "
                    f"{', '.join(FEATURE_FILES.values())} (the training pair is optional)."
                )
            paths[key] = path if path.is_file() else None
        return cls.from_files(**paths, metric=metric)

    @property
    def dim(self) -> int:
        return int(self.query_features.shape[1])

    def fitting_data(self) -> tuple[np.ndarray, np.ndarray, str]:
        """(features, labels, "train" | "database"): the set baselines are fitted on."""
        if self.train_features is not None:
            return self.train_features, self.train_labels, "train"
        if self.db_features is None:
            raise ValueError(
                "baselines need features to fit and encode: give database features "
                "(and optionally training features)."
            )
        return self.db_features, self.db_labels, "database"


def _check_pair(features: np.ndarray, labels: np.ndarray, name: str) -> None:
    if not isinstance(features, np.ndarray) or features.ndim != 2:
        shape = getattr(features, "shape", type(features).__name__)
        raise ValueError(f"{name} features must be a 2-D array (n, D); got shape {shape}.")
    if not np.issubdtype(features.dtype, np.number):
        raise ValueError(f"{name} features must be numbers; got dtype {features.dtype}.")
    finite = np.isfinite(features).all(axis=1)
    if not finite.all():
        raise ValueError(
            f"{name} features contain NaN or inf in {int((~finite).sum())} row(s) (first: row "
            f"{int(np.flatnonzero(~finite)[0])}); check the feature extractor."
        )
    if labels.ndim not in (1, 2):
        raise ValueError(
            f"{name} labels must be int (n,) class ids or multi-hot (n, C); got shape {labels.shape}."
        )
    if features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{name} features have {features.shape[0]} rows but {name} labels have "
            f"{labels.shape[0]}; give one label per feature row, in the same order."
        )


def _check_same_dim(query: np.ndarray, other: np.ndarray, name: str) -> None:
    if query.shape[1] != other.shape[1]:
        raise ValueError(
            f"query features have dimension {query.shape[1]} but {name} features have "
            f"{other.shape[1]}; use features from the same model."
        )


# ---------------------------------------------------------------------------- searchers


class PrefixSearcher:
    """A :class:`~dpq.index.DPQIndex` searched with its first ``num_levels`` codes."""

    def __init__(self, index: Any, num_levels: int) -> None:
        self.index, self.num_levels = index, num_levels

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k, num_levels=self.num_levels)


class ExactSearcher:
    """Exhaustive search over float (N, D) database rows (faiss flat indexes).

    ``metric`` "l2": squared Euclidean distances; "ip": negative inner products (so smaller
    is better in both). Ties are ordered by ascending id.
    """

    def __init__(self, database: np.ndarray, metric: str = "l2") -> None:
        import faiss

        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}; got {metric!r}.")
        self.metric = metric
        self.index = (faiss.IndexFlatIP if metric == "ip" else faiss.IndexFlatL2)(database.shape[1])
        self.index.add(np.ascontiguousarray(database, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from dpq.evaluate.baselines.base import order_ties_by_id

        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        distances = -scores if self.metric == "ip" else scores
        distances[ids < 0] = np.inf
        return order_ties_by_id(distances, ids.astype(np.int64, copy=False))


# ---------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Prepared:
    """A method's searcher, ready to search, with what it cost to get there.

    Attributes:
        searcher: the searcher over the database.
        fit_seconds: fitting time (None when nothing was fitted here).
        encode_seconds: encoding the database (None when not measured here).
        settings: the method's parameters, for the results file.
    """

    searcher: Searcher
    fit_seconds: float | None
    encode_seconds: float | None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One row of an evaluation at one code length.

    Attributes:
        name: the method's name in tables ("dpq", "pq", "float", ...).
        bits: code length (exact float search: 32 * D).
        prepare: builds the searcher (fitting and encoding happen here and are timed).
        reference: an unquantized reference row (exact float search): kept out of the
            code-length table and reported as the ceiling.
        fits: the method is fitted on the feature set's fitting data.
    """

    name: str
    bits: int
    prepare: Callable[[], Prepared]
    reference: bool = False
    fits: bool = False


def dpq_methods(
    index: Any,
    bits: Sequence[int] | None = None,
    n_database: int | None = None,
    dim: int | None = None,
    encode_seconds: float | None = None,
) -> list[Method]:
    """Rows of a :class:`~dpq.index.DPQIndex`, one per code length (prefix).

    Args:
        index: the index of the database (items in database order, ids 0..N-1).
        bits: code lengths, each a multiple of log2(K) up to L log2(K) (default: every prefix).
        n_database, dim: when given, checked against the index.
        encode_seconds: the time it took to encode the database, when measured by the caller.
    """
    bits_per_level = math.log2(index.codebook_size)
    possible = [int(level * bits_per_level) for level in range(1, index.num_levels + 1)]
    if n_database is not None and index.ntotal != n_database:
        raise ValueError(
            f"the DPQ index holds {index.ntotal} items but there are {n_database} database "
            "labels; build the index from the same database, in the same order (ids 0..N-1)."
        )
    if dim is not None and index.dim != dim:
        raise ValueError(
            f"the DPQ index has dimension {index.dim} but the query features have {dim}; "
            "use features from the model the index was built with."
        )
    search = "asymmetric (AQD)" if index.search_mode == "aqd" else "inner product (asymmetric)"
    methods = []
    for code_bits in possible if bits is None else bits:
        if code_bits not in possible:
            raise ValueError(
                f"the DPQ index has {index.num_levels} levels of {bits_per_level:g} bits, so "
                f"it gives codes of {possible} bits; {code_bits} bits is not one of them."
            )
        levels = possible.index(code_bits) + 1
        settings = {
            "name": "dpq",
            "bits": code_bits,
            "num_levels": levels,
            "codebook_size": int(index.codebook_size),
            "search": search,
        }
        methods.append(
            Method(
                "dpq",
                code_bits,
                lambda levels=levels, settings=settings: Prepared(
                    PrefixSearcher(index, levels), None, encode_seconds, settings
                ),
            )
        )
    return methods


def baseline_methods(
    names: Sequence[str],
    bits: Sequence[int],
    features: FeatureSet,
    seed: int = 0,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Method]:
    """Rows of baselines (:data:`dpq.evaluate.baselines.BASELINES` names), one per name and length,
    fitted on ``features.fitting_data()`` and encoding its database.

    With ``features.metric == "ip"``, quantizers rank by the inner product with their
    reconstructions (asymmetric); hashing baselines rank by Hamming distance either way.
    """

    def prepare(name: str, code_bits: int) -> Prepared:
        fit_features, fit_labels, _ = features.fitting_data()
        baseline = make_baseline(name, code_bits, seed=seed, **dict((options or {}).get(name, {})))
        began = time.perf_counter()
        baseline.fit(fit_features, fit_labels)
        fit_seconds = time.perf_counter() - began
        settings = {**baseline.describe(), "fitted_on_rows": int(fit_features.shape[0])}
        began = time.perf_counter()
        searcher: Searcher
        if features.metric == "ip" and hasattr(baseline, "decode"):
            # asymmetric inner product = exact inner product with the reconstructions
            reconstructions = baseline.decode(baseline.encode(features.db_features))
            searcher = ExactSearcher(reconstructions, "ip")
            settings["search"] = "inner product with the reconstruction (asymmetric)"
        else:
            baseline.add(features.db_features)
            searcher = baseline
        return Prepared(searcher, fit_seconds, time.perf_counter() - began, settings)

    return [
        Method(name, code_bits, lambda n=name, b=code_bits: prepare(n, b), fits=True)
        for name in names
        for code_bits in bits
    ]


def float_method(features: FeatureSet) -> Method:
    """The reference row: exact search over the unquantized database features."""
    if features.db_features is None:
        raise ValueError("the exact float reference needs database features.")

    def prepare() -> Prepared:
        began = time.perf_counter()
        searcher = ExactSearcher(features.db_features, features.metric)
        kind = "inner product" if features.metric == "ip" else "squared L2"
        settings = {"name": "float", "search": f"exhaustive {kind} on float32 features"}
        return Prepared(searcher, None, time.perf_counter() - began, settings)

    return Method("float", 32 * features.dim, prepare, reference=True)


# ---------------------------------------------------------------------------- results


@dataclass
class MethodResult:
    """mAP@R and timings of one method at one code length.

    Attributes:
        method: the method's name.
        bits: code length (exact float search: 32 * D).
        map: mAP@R (DVSQ convention, :func:`dpq.evaluate.metrics.map_at_r`).
        fit_seconds: fitting time (None when not fitted here).
        encode_seconds: encoding the database (None when not measured).
        search_seconds: searching all queries at k = R, ranking included.
        n_queries, n_database: sizes, for per-item times.
        settings: the method's parameters.
        reference: the unquantized reference row.
        pr: precision-recall curve (only at the curve code lengths).
        precision_at: {"ranks": [...], "precision": [...]} (only at the curve code lengths).
    """

    method: str
    bits: int
    map: float
    fit_seconds: float | None
    encode_seconds: float | None
    search_seconds: float
    n_queries: int
    n_database: int
    settings: dict[str, Any] = field(default_factory=dict)
    reference: bool = False
    pr: PRCurve | None = None
    precision_at: dict[str, list[float]] | None = None

    @property
    def encode_ms_per_item(self) -> float | None:
        if self.encode_seconds is None:
            return None
        return 1e3 * self.encode_seconds / self.n_database

    @property
    def search_ms_per_query(self) -> float:
        return 1e3 * self.search_seconds / self.n_queries

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "bits": self.bits,
            "map": self.map,
            "fit_seconds": self.fit_seconds,
            "encode_seconds": self.encode_seconds,
            "search_seconds": self.search_seconds,
            "encode_ms_per_item": self.encode_ms_per_item,
            "search_ms_per_query": self.search_ms_per_query,
            "settings": self.settings,
            "reference": self.reference,
            "pr_curve": None if self.pr is None else self.pr.to_dict(),
            "precision_at": self.precision_at,
        }


@dataclass
class Evaluation:
    """All results of one :func:`evaluate_methods` run."""

    results: list[MethodResult]
    r: int
    r_requested: int | None
    fitted_on: str | None
    n_queries: int
    n_database: int
    notes: list[str] = field(default_factory=list)

    def map_table(self) -> dict[str, dict[int, float]]:
        """{method: {bits: mAP}} in run order (reference rows excluded)."""
        table: dict[str, dict[int, float]] = {}
        for result in self.results:
            if not result.reference:
                table.setdefault(result.method, {})[result.bits] = result.map
        return table

    def float_reference(self) -> float | None:
        """mAP@R of exhaustive search on the unquantized features, if it was run."""
        for result in self.results:
            if result.reference:
                return result.map
        return None

    def timings(self) -> dict[str, dict[str, float | None]]:
        """{"method@bits": {fit_s, encode_ms_per_item, search_ms_per_query}} for reports."""
        return {
            f"{result.method}@{result.bits}": {
                "fit_s": result.fit_seconds,
                "encode_ms_per_item": result.encode_ms_per_item,
                "search_ms_per_query": result.search_ms_per_query,
            }
            for result in self.results
        }

    def curves(
        self, bits: int
    ) -> tuple[dict[str, PRCurve], dict[str, tuple[np.ndarray, np.ndarray]]]:
        """(PR curves, precision@R curves as (ranks, precision)) by method at ``bits``."""
        pr: dict[str, PRCurve] = {}
        at_r: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for result in self.results:
            if result.bits == bits and result.pr is not None:
                pr[result.method] = result.pr
            if result.bits == bits and result.precision_at is not None:
                at_r[result.method] = (
                    np.asarray(result.precision_at["ranks"]),
                    np.asarray(result.precision_at["precision"]),
                )
        return pr, at_r

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": "mAP@R, AP divided by the relevant items found in the top R (DVSQ/DPQ)",
            "r": self.r,
            "r_requested": self.r_requested,
            "n_queries": self.n_queries,
            "n_database": self.n_database,
            "baselines_fitted_on": self.fitted_on,
            "map": {m: {str(b): v for b, v in row.items()} for m, row in self.map_table().items()},
            "float_features_map": self.float_reference(),
            "notes": self.notes,
            "results": [result.to_dict() for result in self.results],
        }


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
        methods: the rows (:func:`dpq_methods`, :func:`baseline_methods`, :func:`float_method`).
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


@dataclass
class RetrievalEvaluation:
    """mAP@R of one model's codes at every prefix length, with timings.

    Attributes:
        map_by_bits: code length in bits (l * log2 K) -> mAP@R of AQD search over the codes
            (inner-product search for class-posterior features).
        r: R, the number of ranked database items scored.
        float_map: mAP@R of exact search (Euclidean, or inner product for class-posterior
            features) over the float features (a ceiling for the codes), or None when not
            computed.
        query_accuracy: classifier accuracy on the queries (single-label only).
        seconds: wall time of "features" (network), "encode" (codes), "search" (all code
            lengths, scoring included).
        num_queries: number of queries.
        num_database: database size.
        details: the :class:`Evaluation` behind the numbers (per-method timings, curves,
            baselines when asked for).
        database_accuracy: classifier accuracy on the database (single-label only).
        class_probability_map: mAP@R of ranking the database by the L2 distance between
            softmax class probabilities (single-label only): what a fully class-collapsed
            embedding of this classifier would reach, a diagnostic of how tightly the
            features gather by class, not a code.
    """

    map_by_bits: dict[int, float]
    r: int
    float_map: float | None
    query_accuracy: float | None
    seconds: dict[str, float]
    num_queries: int
    num_database: int
    details: Evaluation | None = None
    database_accuracy: float | None = None
    class_probability_map: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (bit counts become string keys)."""
        out = {
            "map": {str(bits): value for bits, value in self.map_by_bits.items()},
            "r": self.r,
            "float_map": self.float_map,
            "query_accuracy": self.query_accuracy,
            "database_accuracy": self.database_accuracy,
            "class_probability_map": self.class_probability_map,
            "seconds": self.seconds,
            "num_queries": self.num_queries,
            "num_database": self.num_database,
        }
        if self.details is not None:
            out["details"] = self.details.to_dict()
        return out


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
    """A trained model on a query set and a database: features, codes at every prefix,
    exact float search and optional baselines, scored with mAP@R.

    Args:
        model: a trained :class:`~dpq.model.network.DPQModel`.
        query_inputs, database_inputs: uint8 (N, H, W, 3) images or float (N, F) features.
        query_labels, database_labels: int64 (N,) or multi-hot (N, C).
        r: R of mAP@R (default: the whole database).
        float_baseline: also score exact search over the float features.
        baselines: names of :data:`dpq.evaluate.baselines.BASELINES` fitted on the training features.
        train_inputs, train_labels: the training set, for fitting the baselines.
        curves: compute PR and precision@R curves at the longest code.
        progress: report progress on stderr.
        workers: decoding processes for images read on demand (see
            :meth:`dpq.model.network.DPQModel.extract_features`).
    """
    from dpq.encode.build import add_features, empty_index

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
    index = empty_index(model)
    add_features(index, model, database_features)
    seconds["encode"] = time.perf_counter() - begin

    features = FeatureSet(
        query_features=query_features,
        query_labels=np.asarray(query_labels),
        db_labels=np.asarray(database_labels),
        db_features=database_features,
        train_features=train_features,
        train_labels=None if train_features is None else np.asarray(train_labels),
        metric="ip" if index.search_mode == "ip" else "l2",
    )
    methods = dpq_methods(index, encode_seconds=seconds["encode"])
    bits = [method.bits for method in methods]
    methods += baseline_methods(baselines, bits, features)
    if float_baseline:
        methods.append(float_method(features))
    begin = time.perf_counter()
    details = evaluate_methods(
        features, methods, r=r, curve_bits=(bits[-1],) if curves else (), progress=progress
    )
    seconds["search"] = time.perf_counter() - begin
    accuracy = database_accuracy = probability_map = None
    if np.asarray(query_labels).ndim == 1:
        accuracy = float((query_logits.argmax(1) == np.asarray(query_labels)).mean())
        database_accuracy = float((database_logits.argmax(1) == np.asarray(database_labels)).mean())
        probability_map = class_probability_map(
            query_logits, database_logits, query_labels, database_labels, details.r
        )
    return RetrievalEvaluation(
        map_by_bits=dict(details.map_table()["dpq"]),
        r=details.r,
        float_map=details.float_reference(),
        query_accuracy=accuracy,
        seconds={k: round(v, 2) for k, v in seconds.items()},
        num_queries=len(query_labels),
        num_database=len(database_labels),
        details=details,
        database_accuracy=database_accuracy,
        class_probability_map=probability_map,
    )


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
