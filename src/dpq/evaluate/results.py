"""What an evaluation returns: :class:`MethodResult` per method and code length,
:class:`Evaluation` for one :func:`~dpq.evaluate.retrieval.evaluate_methods` run, and
:class:`RetrievalEvaluation` for a trained model (:func:`~dpq.evaluate.retrieval.evaluate_retrieval`);
each turns into a JSON-ready dict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dpq.evaluate.metrics import PRCurve


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


@dataclass
class RetrievalEvaluation:
    """mAP@R of one model's codes at each of its code lengths, with timings.

    Attributes:
        map_by_bits: code length in bits -> mAP@R of the method's search over the codes (a
            DPQ model: every prefix l log2 K, AQD, or inner-product search for
            class-posterior features; a hashing method: its one length, Hamming distance).
        r: R, the number of ranked database items scored.
        float_map: mAP@R of exact search (Euclidean, or inner product for class-posterior
            features) over the float features (a ceiling for the codes), or None when not
            computed.
        query_accuracy: classifier accuracy on the queries (single-label, with a classifier).
        seconds: wall time of "features" (network), "encode" (codes), "search" (all code
            lengths, scoring included).
        num_queries: number of queries.
        num_database: database size.
        details: the :class:`Evaluation` behind the numbers (per-method timings, curves,
            baselines when asked for).
        database_accuracy: classifier accuracy on the database (as ``query_accuracy``).
        class_probability_map: mAP@R of ranking the database by the L2 distance between
            softmax class probabilities (as ``query_accuracy``): what a fully class-collapsed
            embedding of this classifier would reach, a diagnostic of how tightly the
            features gather by class, not a code.
        method: the name of the model's method (``config.method.name``).
        search: how its codes were searched ("AQD", "inner-product search", "Hamming
            distance").
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
    method: str = "dpq"
    search: str = "AQD"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (bit counts become string keys)."""
        out = {
            "method": self.method,
            "search": self.search,
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
