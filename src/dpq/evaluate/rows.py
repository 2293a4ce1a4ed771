"""The rows of an evaluation: each method at one code length, and the searcher it builds.

A searcher is anything with ``search(queries, k) -> (distances, ids)`` (float32 or int
(nq, k), int64 (nq, k), ascending, ``-1`` for missing): an index of a trained model at one
of its code lengths (searched by its method, :meth:`dpq.methods.base.RetrievalMethod.search`),
an index file read without its model (a :class:`~dpq.index.DPQIndex` at a prefix, a
:class:`~dpq.index.binary.BinaryIndex` by the signs of float queries), exact float search,
every baseline of :mod:`dpq.evaluate.baselines`. A :class:`Method` names one row of a results
table (a name and a code length) and knows how to build its searcher (fitting and encoding,
timed).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from dpq.evaluate.baselines import make_baseline
from dpq.evaluate.feature_set import METRICS, FeatureSet

if TYPE_CHECKING:  # pragma: no cover
    from dpq.index.kinds import AnyIndex
    from dpq.methods.base import RetrievalMethod

DEFAULT_BITS: tuple[int, ...] = (8, 16, 24, 32)


class Searcher(Protocol):
    """Ranks a database for queries: float (nq, D) -> (float32 (nq, k), int64 (nq, k))."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


# ---------------------------------------------------------------------------- searchers


class PrefixSearcher:
    """A :class:`~dpq.index.DPQIndex` searched with its first ``num_levels`` codes."""

    def __init__(self, index: Any, num_levels: int) -> None:
        self.index, self.num_levels = index, num_levels

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k, num_levels=self.num_levels)


class SignSearcher:
    """A :class:`~dpq.index.binary.BinaryIndex` searched by Hamming distance to the signs of
    float (nq, bits) queries (:func:`dpq.index.kinds.binary_queries`)."""

    def __init__(self, index: Any) -> None:
        self.index = index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from dpq.index.kinds import binary_queries

        return self.index.search(binary_queries(self.index, queries), k)


class MethodSearcher:
    """An index of a trained model searched the way its method searches it at ``bits``
    (:meth:`dpq.methods.base.RetrievalMethod.search`: AQD at a prefix for DPQ, Hamming
    distance between codes for a hashing method)."""

    def __init__(self, method: RetrievalMethod, index: Any, bits: int) -> None:
        self.method, self.index, self.bits = method, index, bits

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.method.search(self.index, queries, k, bits=self.bits)


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


# ---------------------------------------------------------------------------- rows


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
    name: str = "dpq",
    searcher: Callable[[int], Searcher] | None = None,
) -> list[Method]:
    """Rows of a :class:`~dpq.index.DPQIndex`, one per code length (prefix).

    Args:
        index: the index of the database (items in database order, ids 0..N-1).
        bits: code lengths, each a multiple of log2(K) up to L log2(K) (default: every prefix).
        n_database, dim: when given, checked against the index.
        encode_seconds: the time it took to encode the database, when measured by the caller.
        name: the rows' name.
        searcher: bits -> the searcher of that row (default: the index at that prefix).
    """
    from dpq.index.kinds import code_lengths

    possible = list(code_lengths(index))
    bits_per_level = math.log2(index.codebook_size)
    _check_index(index, index.ntotal, n_database, dim, index.dim, "DPQ")
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
            "name": name,
            "bits": code_bits,
            "num_levels": levels,
            "codebook_size": int(index.codebook_size),
            "search": search,
        }
        row_searcher = PrefixSearcher(index, levels) if searcher is None else searcher(code_bits)
        methods.append(_index_row(name, code_bits, row_searcher, encode_seconds, settings))
    return methods


def binary_methods(
    index: Any,
    bits: Sequence[int] | None = None,
    n_database: int | None = None,
    dim: int | None = None,
    encode_seconds: float | None = None,
    name: str = "binary",
    searcher: Callable[[int], Searcher] | None = None,
) -> list[Method]:
    """The row of a :class:`~dpq.index.binary.BinaryIndex` at its code length, when ``bits``
    (default: its length) includes it (ValueError when not).

    Args:
        index: the index of the database (items in database order, ids 0..N-1).
        bits: the code lengths asked for; the index answers at its own.
        n_database, dim: when given, checked against the index (float queries have one
            feature per bit).
        encode_seconds, name: as in :func:`dpq_methods`.
        searcher: bits -> the searcher (default: the signs of the float queries).
    """
    _check_index(index, index.ntotal, n_database, dim, index.bits, "binary")
    if bits is not None and index.bits not in bits:
        raise ValueError(
            f"the binary index holds {index.bits}-bit codes; ask for --bits {index.bits} "
            f"(got {', '.join(map(str, bits))})."
        )
    settings = {
        "name": name,
        "bits": index.bits,
        "search": "Hamming distance (faiss IndexBinaryFlat)",
    }
    row_searcher = SignSearcher(index) if searcher is None else searcher(index.bits)
    return [_index_row(name, index.bits, row_searcher, encode_seconds, settings)]


def index_methods(
    index: AnyIndex,
    name: str,
    bits: Sequence[int] | None = None,
    n_database: int | None = None,
    dim: int | None = None,
    encode_seconds: float | None = None,
    searcher: Callable[[int], Searcher] | None = None,
) -> list[Method]:
    """The rows of an index of either kind, named ``name``: :func:`dpq_methods` for a DPQ
    index, :func:`binary_methods` for a binary one (arguments as there)."""
    from dpq.index.kinds import kind_of

    rows = dpq_methods if kind_of(index) == "dpq" else binary_methods
    return rows(index, bits, n_database, dim, encode_seconds, name, searcher)


def method_rows(
    method: RetrievalMethod, index: AnyIndex, encode_seconds: float | None = None
) -> list[Method]:
    """The rows of a trained model's index, one per code length of its method
    (:meth:`~dpq.methods.base.RetrievalMethod.code_lengths`: DPQ every prefix, a hashing
    method its one length), named by the method and searched by it."""
    return index_methods(
        index,
        method.name,
        method.code_lengths(),
        encode_seconds=encode_seconds,
        searcher=lambda bits: MethodSearcher(method, index, bits),
    )


def _check_index(
    index: Any, ntotal: int, n_database: int | None, dim: int | None, index_dim: int, kind: str
) -> None:
    if n_database is not None and ntotal != n_database:
        raise ValueError(
            f"the {kind} index holds {ntotal} items but there are {n_database} database "
            "labels; build the index from the same database, in the same order (ids 0..N-1)."
        )
    if dim is not None and index_dim != dim:
        raise ValueError(
            f"the {kind} index has dimension {index_dim} but the query features have {dim}; "
            "use features from the model the index was built with."
        )


def _index_row(
    name: str, bits: int, searcher: Searcher, encode_seconds: float | None, settings: dict
) -> Method:
    return Method(name, bits, lambda: Prepared(searcher, None, encode_seconds, settings))


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
