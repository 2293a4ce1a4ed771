"""Run baselines (and a DPQ index) on one feature set and score them with ``dpq.metrics``.

Every method searches the same queries against the same database, at each code length,
with k = R; rankings go to :func:`dpq.metrics.average_precision_at_r` in query batches so a
1,000 x 54,000 evaluation needs a few hundred MB, not gigabytes. Timings are wall-clock
seconds measured here: fitting, encoding the database, and searching all queries at k = R.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dpq.baselines import BASELINES, make_baseline
from dpq.metrics import (
    PRCurve,
    average_precision_at_r,
    default_cutoffs,
    pr_curve,
    precision_at,
)

DEFAULT_BITS: tuple[int, ...] = (8, 16, 24, 32)
DEFAULT_PRECISION_RANKS: tuple[int, ...] = tuple(range(100, 1001, 100))
DPQ_METHOD = "dpq"
FLOAT_METHOD = "float"  # exhaustive search on the unquantized features, a reference
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


def load_array(path: str | Path, name: str) -> np.ndarray:
    """A .npy array, never unpickled; FileNotFoundError / ValueError naming ``name``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name} file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"could not read {name} from {path} as a .npy array: {exc}") from exc


@dataclass(frozen=True)
class FeatureSet:
    """Query / database / (optional) training features with their labels.

    Features are float (n, D); labels int (n,) class ids or multi-hot (n, C). Database
    features may be None when only a DPQ index (which holds its own codes) is evaluated.
    ``metric`` is how the features compare: "l2" (squared Euclidean, the default) or "ip"
    (inner product, larger is closer: class-posterior features); it decides how "float" and
    the quantization baselines rank (the hashing baselines rank by Hamming distance either
    way; a DPQ index ranks by its own ``search_mode``).
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
    ) -> FeatureSet:
        """Load .npy files (``allow_pickle=False``)."""
        paths = {
            "query_features": query_features,
            "query_labels": query_labels,
            "db_labels": db_labels,
            "db_features": db_features,
            "train_features": train_features,
            "train_labels": train_labels,
        }
        arrays = {
            key: None if path is None else load_array(path, key.replace("_", " "))
            for key, path in paths.items()
        }
        return cls(**arrays)

    @classmethod
    def from_directory(cls, directory: str | Path) -> FeatureSet:
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
        return cls.from_files(**paths)

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


@dataclass
class MethodResult:
    """mAP@R and timings of one method at one code length.

    Attributes:
        method: baseline name, ``"dpq"`` or ``"float"``.
        bits: code length (for ``"float"``: 32 * D).
        map: mAP@R (DVSQ convention, :func:`dpq.metrics.map_at_r`).
        fit_seconds: fitting time (None for a DPQ index, trained elsewhere).
        encode_seconds: encoding the database (None when not measured).
        search_seconds: searching all queries at k = R, ranking included.
        n_queries, n_database: sizes, for per-item times.
        settings: the method's parameters (``Baseline.describe()``).
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
        """{method: {bits: mAP}} in run order (the ``float`` reference excluded)."""
        table: dict[str, dict[int, float]] = {}
        for result in self.results:
            if result.method != FLOAT_METHOD:
                table.setdefault(result.method, {})[result.bits] = result.map
        return table

    def float_reference(self) -> float | None:
        """mAP@R of exhaustive L2 search on the unquantized features, if it was run."""
        for result in self.results:
            if result.method == FLOAT_METHOD:
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


def parse_methods(text: str | None) -> list[str]:
    """``"all"`` -> every baseline; ``"pq,opq"`` -> ["pq", "opq"]; None/"" -> []."""
    if not text:
        return []
    if text.strip() == "all":
        return list(BASELINES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = (*BASELINES, DPQ_METHOD, FLOAT_METHOD)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)} or 'all'."
        )
    return list(dict.fromkeys(names))


def parse_bits(text: str) -> list[int]:
    """``"8,16,24,32"`` -> [8, 16, 24, 32] (positive integers)."""
    try:
        bits = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"bits must be comma-separated integers such as 8,16,24,32; got {text!r}."
        ) from None
    if not bits or min(bits) < 1:
        raise ValueError(f"bits must be positive integers such as 8,16,24,32; got {text!r}.")
    return list(dict.fromkeys(bits))


def evaluate_methods(
    features: FeatureSet,
    methods: Sequence[str],
    bits: Sequence[int] = DEFAULT_BITS,
    r: int | None = None,
    dpq_index: Any = None,
    seed: int = 0,
    curve_bits: Sequence[int] = (32,),
    precision_ranks: Sequence[int] = DEFAULT_PRECISION_RANKS,
    progress: bool = True,
    options: dict[str, dict[str, Any]] | None = None,
) -> Evaluation:
    """Fit, encode, search and score each method at each code length.

    Args:
        features: the feature set (see :class:`FeatureSet`).
        methods: baseline names (``BASELINES``), ``"dpq"`` (needs ``dpq_index``) and/or
            ``"float"`` (exhaustive L2 on the features, a reference without quantization).
        bits: code lengths. For dpq, bits / log2(codebook_size) levels are searched.
        r: mAP@R cutoff; default: the whole database. Clamped to the database size.
        dpq_index: a ``dpq.index.DPQIndex`` (or a path to one) whose items are the database
            in the order of ``features.db_labels`` (ids 0..N-1).
        seed: seed of every baseline.
        curve_bits: code lengths at which PR and precision@R curves are computed.
        precision_ranks: cutoffs of the precision@R curve (kept where <= R).
        progress: show a tqdm bar.
        options: per-baseline constructor options, e.g. {"lsq": {"train_iterations": 10}}.

    Returns:
        An :class:`Evaluation`.
    """
    methods = list(methods)
    if not methods:
        raise ValueError("no method to evaluate: give --method and/or --baselines.")
    bits = [int(b) for b in bits]
    n_database = int(features.db_labels.shape[0])
    notes: list[str] = []
    r_used = n_database if r is None else int(r)
    if r_used < 1:
        raise ValueError(f"r must be at least 1; got {r}.")
    if r_used > n_database:
        notes.append(f"R = {r_used} is larger than the database; used R = {n_database}.")
        r_used = n_database
    ranks = [rank for rank in precision_ranks if rank <= r_used] or [r_used]

    index = None
    if DPQ_METHOD in methods:
        index = _load_dpq_index(dpq_index, n_database, features.dim)
    fitted_on = None
    fit_features = fit_labels = None
    if any(method in BASELINES for method in methods):
        fit_features, fit_labels, fitted_on = features.fitting_data()
        if fitted_on == "database":
            notes.append(
                "No training features given: baselines were fitted on the database features."
            )

    jobs = [(method, b) for method in methods if method != FLOAT_METHOD for b in bits]
    if FLOAT_METHOD in methods:
        jobs.append((FLOAT_METHOD, 32 * features.dim))
    results: list[MethodResult] = []
    bar = tqdm(jobs, desc="evaluate", unit="run", disable=not progress)
    for method, code_bits in bar:
        bar.set_postfix_str(f"{method} {code_bits} bits")
        with_curves = code_bits in curve_bits
        if method == DPQ_METHOD:
            result = _evaluate_dpq(index, features, code_bits, r_used, with_curves, ranks)
        elif method == FLOAT_METHOD:
            result = _evaluate_float(features, r_used, ranks)
        else:
            result = _evaluate_baseline(
                method, code_bits, features, fit_features, fit_labels, r_used, seed,
                with_curves, ranks, (options or {}).get(method, {}),
            )  # fmt: skip
        results.append(result)
    return Evaluation(
        results=results,
        r=r_used,
        r_requested=r,
        fitted_on=fitted_on,
        n_queries=int(features.query_labels.shape[0]),
        n_database=n_database,
        notes=notes,
    )


# --------------------------------------------------------------------------- internals


def _check_pair(features: np.ndarray, labels: np.ndarray, name: str) -> None:
    if features.ndim != 2:
        raise ValueError(f"{name} features must be a 2-D array (n, D); got shape {features.shape}.")
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


def _load_dpq_index(dpq_index: Any, n_database: int, dim: int) -> Any:
    if dpq_index is None:
        raise ValueError(
            "method 'dpq' needs a DPQ index: pass --index PATH (dpq.index.DPQIndex file)."
        )
    if isinstance(dpq_index, str | Path):
        from dpq.index import DPQIndex  # lazy: only this method needs it

        dpq_index = DPQIndex.load(dpq_index)
    if dpq_index.ntotal != n_database:
        raise ValueError(
            f"the DPQ index holds {dpq_index.ntotal} items but there are {n_database} database "
            "labels; build the index from the same database, in the same order (ids 0..N-1)."
        )
    if dpq_index.dim != dim:
        raise ValueError(
            f"the DPQ index has dimension {dpq_index.dim} but the query features have {dim}; "
            "use features from the model the index was built with."
        )
    return dpq_index


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

    def result(self, method: str, bits: int, **timing: Any) -> MethodResult:
        curves: dict[str, Any] = {}
        if self.with_curves:
            curves["pr"] = PRCurve(self.cutoffs, self.pr_precision, self.pr_recall)
            curves["precision_at"] = {
                "ranks": [int(rank) for rank in self.ranks],
                "precision": [float(p) for p in self.at_r],
            }
        return MethodResult(
            method=method,
            bits=bits,
            map=float(self.ap.mean()),
            n_queries=self.ap.size,
            n_database=int(self.features.db_labels.shape[0]),
            **timing,
            **curves,
        )


def _search_and_score(
    search, features: FeatureSet, r: int, with_curves: bool, ranks
) -> tuple[_Scorer, float]:
    """Run ``search(queries, k) -> (distances, ids)`` in query batches; returns the scorer
    and the seconds spent searching (scoring excluded)."""
    scorer = _Scorer(features, r, with_curves, ranks)
    queries = features.query_features
    seconds = 0.0
    for start in range(0, queries.shape[0], scorer.batch):
        began = time.perf_counter()
        _, ids = search(queries[start : start + scorer.batch], r)
        seconds += time.perf_counter() - began
        scorer.score(start, ids)
    return scorer, seconds


def _evaluate_baseline(
    name, bits, features, fit_features, fit_labels, r, seed, with_curves, ranks, options
) -> MethodResult:
    baseline = make_baseline(name, bits, seed=seed, **options)
    began = time.perf_counter()
    baseline.fit(fit_features, fit_labels)
    fit_seconds = time.perf_counter() - began
    settings = {**baseline.describe(), "fitted_on_rows": int(fit_features.shape[0])}
    began = time.perf_counter()
    if features.metric == "ip" and hasattr(baseline, "decode"):
        # asymmetric inner product = exact inner product with the reconstructions
        reconstructions = baseline.decode(baseline.encode(features.db_features))
        search = _inner_product_search(reconstructions)
        settings["search"] = "inner product with the reconstruction (asymmetric)"
    else:
        baseline.add(features.db_features)
        search = baseline.search
    encode_seconds = time.perf_counter() - began
    scorer, search_seconds = _search_and_score(search, features, r, with_curves, ranks)
    return scorer.result(
        name,
        bits,
        fit_seconds=fit_seconds,
        encode_seconds=encode_seconds,
        search_seconds=search_seconds,
        settings=settings,
    )


def _inner_product_search(database: np.ndarray):
    """``search(queries, k) -> (-inner products float32 (nq, k), ids int64 (nq, k))`` over
    float (N, D) database rows, exhaustive (faiss IndexFlatIP); ties by ascending id."""
    import faiss

    from dpq.baselines.base import order_ties_by_id

    index = faiss.IndexFlatIP(database.shape[1])
    index.add(np.ascontiguousarray(database, dtype=np.float32))

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        distances = -scores
        distances[ids < 0] = np.inf
        return order_ties_by_id(distances, ids.astype(np.int64, copy=False))

    return search


def _evaluate_dpq(
    index, features: FeatureSet, bits: int, r: int, with_curves, ranks
) -> MethodResult:
    bits_per_level = math.log2(index.codebook_size)
    num_levels = bits / bits_per_level
    if not num_levels.is_integer() or not 1 <= num_levels <= index.num_levels:
        possible = [int(level * bits_per_level) for level in range(1, index.num_levels + 1)]
        raise ValueError(
            f"the DPQ index has {index.num_levels} levels of {bits_per_level:g} bits, so it "
            f"gives codes of {possible} bits; {bits} bits is not one of them."
        )
    num_levels = int(num_levels)
    encode_seconds = None
    if features.db_features is not None:
        began = time.perf_counter()
        index.encode(features.db_features, num_levels=num_levels)
        encode_seconds = time.perf_counter() - began

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return index.search(queries, k, num_levels=num_levels)

    scorer, search_seconds = _search_and_score(search, features, r, with_curves, ranks)
    return scorer.result(
        DPQ_METHOD,
        bits,
        fit_seconds=None,
        encode_seconds=encode_seconds,
        search_seconds=search_seconds,
        settings={
            "name": DPQ_METHOD,
            "bits": bits,
            "num_levels": num_levels,
            "codebook_size": int(index.codebook_size),
            "search": "asymmetric (AQD)"
            if index.search_mode == "aqd"
            else "inner product (asymmetric)",
        },
    )


def _evaluate_float(features: FeatureSet, r: int, ranks) -> MethodResult:
    import faiss

    from dpq.baselines.base import order_ties_by_id

    if features.db_features is None:
        raise ValueError("the 'float' reference needs database features.")
    began = time.perf_counter()
    if features.metric == "ip":
        search = _inner_product_search(features.db_features)
        description = "exhaustive inner product on float32 features"
    else:
        index = faiss.IndexFlatL2(features.dim)
        index.add(np.ascontiguousarray(features.db_features, dtype=np.float32))
        description = "exhaustive squared L2 on float32 features"

        def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            distances, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
            return order_ties_by_id(distances, ids)

    encode_seconds = time.perf_counter() - began

    scorer, search_seconds = _search_and_score(search, features, r, False, ranks)
    return scorer.result(
        FLOAT_METHOD,
        32 * features.dim,
        fit_seconds=None,
        encode_seconds=encode_seconds,
        search_seconds=search_seconds,
        settings={"name": FLOAT_METHOD, "search": description},
    )
