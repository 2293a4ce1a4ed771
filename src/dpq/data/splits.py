"""Benchmark protocol splits (DPQ paper, section 3.1): training, query and database sets.

- CIFAR-10 (``split_per_class(labels, 500, 100, seed)``): all 60,000 images merged; per
  class 500 training and 100 query images drawn at random; "the remaining images are used
  as database": 54,000, i.e. everything not drawn for training or queries.
- NUS-WIDE-21 (``split_nus_wide(num_items)``): 5,000 random queries, the rest is the
  database, 10,000 training images drawn from the database.
- ImageNet-100 (``split_imagenet100(database_labels, num_queries)``): the database is the
  training-set list, the queries are the separate validation list, 100 training images per
  class drawn from the database. ``query`` then indexes the query list
  (``separate_queries=True``), ``train`` and ``database`` the database list.

Every split is deterministic for a seed (``np.random.default_rng(seed)``). Index arrays are
int64 and sorted.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dpq.atomic import write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:
    from dpq.data.sources import Source

SPLIT_FORMAT = "dpq-split"
SPLIT_VERSION = 1


# Row numbers are int64: the largest one a split may hold.
MAX_ROW = 2**63 - 1


def _json_rows(values: Any, name: str, path: Path) -> np.ndarray:
    """int64 rows of a JSON list, refusing anything but whole numbers in 0..MAX_ROW (JSON
    allows 1.5, "3", true and 1e30, which a cast would silently turn into other rows)."""
    if not isinstance(values, list):
        raise ValueError(
            f"{path}: {name} must be a list of row numbers; got {type(values).__name__}. "
            "Make the split again with `dpq data split`"
        )
    for position, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ROW:
            raise ValueError(
                f"{path}: {name}[{position}] is {value!r}, not a row number (a whole number "
                f"in 0..{MAX_ROW}); fix the file or make the split again with `dpq data split`"
            )
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _index_array(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"split.{name} must be a 1-D integer array, got {array.dtype} {array.shape}"
        )
    if array.min() < 0:
        raise ValueError(f"split.{name} holds negative indices")
    if len(np.unique(array)) != len(array):
        raise ValueError(f"split.{name} repeats an index")
    return array.astype(np.int64, copy=False)


@dataclass(frozen=True, eq=False)
class Split:
    """Index arrays of a protocol split.

    Attributes:
        train: int64 (n_train,) indices of the training images.
        query: int64 (n_query,) indices of the queries.
        database: int64 (n_database,) indices of the retrieval database.
        protocol: how it was made, e.g. 'per_class(500,100)'.
        seed: the seed it was drawn with.
        separate_queries: True when ``query`` indexes a separate query list (ImageNet-100)
            rather than the same collection as ``train`` and ``database``.
    """

    train: np.ndarray
    query: np.ndarray
    database: np.ndarray
    protocol: str = "custom"
    seed: int | None = None
    separate_queries: bool = False

    def __post_init__(self) -> None:
        for name in ("train", "query", "database"):
            object.__setattr__(self, name, _index_array(getattr(self, name), name))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Split):
            return NotImplemented
        return (
            np.array_equal(self.train, other.train)
            and np.array_equal(self.query, other.query)
            and np.array_equal(self.database, other.database)
            and (self.protocol, self.seed, self.separate_queries)
            == (other.protocol, other.seed, other.separate_queries)
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "query": len(self.query), "database": len(self.database)}

    def _meta(self) -> dict[str, Any]:
        return {
            "format": SPLIT_FORMAT,
            "version": SPLIT_VERSION,
            "protocol": self.protocol,
            "seed": self.seed,
            "separate_queries": self.separate_queries,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the split to ``path`` (.json or .npz), atomically."""
        path = Path(path)
        if path.suffix == ".json":
            payload = {
                **self._meta(),
                "train": self.train.tolist(),
                "query": self.query.tolist(),
                "database": self.database.tolist(),
            }
            write_json_atomic(path, payload, indent=None)
        elif path.suffix == ".npz":
            buffer = io.BytesIO()
            np.savez_compressed(
                buffer,
                train=self.train,
                query=self.query,
                database=self.database,
                meta=np.array(json.dumps(self._meta())),
            )
            write_bytes_atomic(path, buffer.getvalue())
        else:
            raise ValueError(f"save a split as .json or .npz, got {path.name!r}")

    def rows(self, subset: str, num_items: int, source: str = "the source") -> np.ndarray:
        """int64 indices of ``subset`` ("train", "query" or "database"), checked against a
        source of ``num_items`` items (ValueError when the split indexes past its end, or
        holds no row of that subset: an empty database would encode a 0-item index)."""
        if subset not in ("train", "query", "database"):
            raise ValueError(f"subset must be train, query or database; got {subset!r}")
        indices = getattr(self, subset)
        if not indices.size:
            raise ValueError(
                f"the split holds no {subset} rows, so there is nothing to use as the "
                f"{subset}; make a split with {subset} items (`dpq data split`)"
            )
        if indices.max() >= num_items:
            raise ValueError(
                f"the split indexes {subset} rows up to {indices.max()} but {source} has "
                f"{num_items} items; make the split from the same source (`dpq data split`)"
            )
        return indices

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Split:
        """Read a split written by ``save`` (.json or .npz; never unpickles)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"split file {path} does not exist")
        try:
            if path.suffix == ".json":
                payload = json.loads(path.read_text())
                meta = payload
                arrays = {
                    name: _json_rows(payload[name], name, path)
                    for name in ("train", "query", "database")
                }
            elif path.suffix == ".npz":
                loaded = np.load(path, allow_pickle=False)
                if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy array renamed .npz
                    raise ValueError("it holds one array, not the arrays of a split")
                with loaded as npz:
                    meta = json.loads(str(npz["meta"]))
                    arrays = {name: npz[name] for name in ("train", "query", "database")}
            else:
                raise ValueError(f"a split file must be .json or .npz, got {path.name!r}")
        except ValueError as exc:
            if str(exc).startswith(f"{path}: "):  # a row that is no row number: said already
                raise
            raise ValueError(
                f"{path} is not a split written by `dpq data split` ({exc}); make one with "
                "`dpq data split SOURCE --out split.json`"
            ) from None
        except (KeyError, TypeError, OSError, UnicodeDecodeError, EOFError) as exc:
            raise ValueError(
                f"{path} is not a split written by `dpq data split` ({exc}); make one with "
                "`dpq data split SOURCE --out split.json`"
            ) from None
        if not isinstance(meta, dict) or meta.get("format") != SPLIT_FORMAT:
            raise ValueError(f"{path} is not a dpq split file (format {SPLIT_FORMAT!r} expected)")
        if meta.get("version") != SPLIT_VERSION:
            raise ValueError(
                f"{path} is split format version {meta.get('version')}, this dpq reads "
                f"version {SPLIT_VERSION}; make the split again"
            )
        for name, values in arrays.items():  # .npz arrays: integers only, never cast
            if not np.issubdtype(np.asarray(values).dtype, np.integer) and np.size(values):
                raise ValueError(
                    f"{path}: {name} holds {np.asarray(values).dtype} values, not row numbers; "
                    "make the split again with `dpq data split`"
                )
        return cls(
            np.asarray(arrays["train"], dtype=np.int64),
            np.asarray(arrays["query"], dtype=np.int64),
            np.asarray(arrays["database"], dtype=np.int64),
            protocol=str(meta.get("protocol", "custom")),
            seed=meta.get("seed"),
            separate_queries=bool(meta.get("separate_queries", False)),
        )


def _count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _single_labels(labels: np.ndarray | Sequence[int], function: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(
            f"{function} needs single-label int (N,) labels, got shape {labels.shape}; for "
            "multi-label data use split_nus_wide"
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{function} needs integer class labels, got dtype {labels.dtype}")
    return labels.astype(np.int64, copy=False)


def _class_name(class_index: int, classes: Sequence[str] | None) -> str:
    if classes is not None and 0 <= class_index < len(classes):
        return f"class '{classes[class_index]}' (index {class_index})"
    return f"class {class_index}"


def split_per_class(
    labels: np.ndarray | Sequence[int],
    n_train: int,
    n_query: int,
    seed: int = 0,
    *,
    classes: Sequence[str] | None = None,
    train_in_database: bool = False,
) -> Split:
    """Draw ``n_train`` training and ``n_query`` query items from every class.

    Args:
        labels: int (N,) class index of every item.
        n_train, n_query: items drawn per class (CIFAR-10 protocol: 500 and 100).
        seed: seed of ``np.random.default_rng``; the same seed gives the same split.
        classes: class names, used in error messages.
        train_in_database: keep the training items in the database (some papers do);
            by default, as in the DPQ paper, the database is every item not drawn for
            training or queries (CIFAR-10: 60,000 - 5,000 - 1,000 = 54,000).

    Training and query sets are disjoint. Raises ``ValueError`` naming the class when a
    class has fewer than ``n_train + n_query`` items.
    """
    labels = _single_labels(labels, "split_per_class")
    n_train, n_query = _count(n_train, "n_train"), _count(n_query, "n_query")
    rng = np.random.default_rng(seed)
    train_parts, query_parts = [], []
    for class_index in np.unique(labels):
        members = np.flatnonzero(labels == class_index)
        if len(members) < n_train + n_query:
            raise ValueError(
                f"{_class_name(int(class_index), classes)} has {len(members)} items but the "
                f"split asks for {n_train} training + {n_query} query = {n_train + n_query} per "
                "class; lower the counts per class (--train-per-class / --query-per-class) or add "
                "items to that class"
            )
        drawn = rng.permutation(members)
        query_parts.append(drawn[:n_query])
        train_parts.append(drawn[n_query : n_query + n_train])
    train = np.sort(np.concatenate(train_parts)) if train_parts else np.zeros(0, np.int64)
    query = np.sort(np.concatenate(query_parts)) if query_parts else np.zeros(0, np.int64)
    excluded = query if train_in_database else np.concatenate([train, query])
    database = np.setdiff1d(np.arange(len(labels), dtype=np.int64), excluded)
    protocol = f"per_class(n_train={n_train},n_query={n_query}" + (
        ",train_in_database)" if train_in_database else ")"
    )
    return Split(train, query, database, protocol=protocol, seed=seed)


def split_nus_wide(
    num_items: int, n_query: int = 5000, n_train: int = 10000, seed: int = 0
) -> Split:
    """NUS-WIDE protocol: ``n_query`` random queries, the rest is the database, and
    ``n_train`` training items drawn from the database (so train is inside the database).

    Args:
        num_items: size of the whole collection (NUS-WIDE-21: 195,834).
        n_query, n_train: 5,000 and 10,000 in the paper.
        seed: seed of ``np.random.default_rng``.
    """
    num_items = _count(num_items, "num_items")
    n_query, n_train = _count(n_query, "n_query"), _count(n_train, "n_train")
    if n_query + n_train > num_items:
        raise ValueError(
            f"the collection has {num_items} items but the split asks for {n_query} queries and "
            f"{n_train} training items drawn from the remaining {max(num_items - n_query, 0)}; "
            "lower n_query/n_train"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_items)
    query = np.sort(order[:n_query])
    database = np.sort(order[n_query:])
    train = np.sort(rng.choice(database, size=n_train, replace=False))
    protocol = f"nus_wide(n_query={n_query},n_train={n_train})"
    return Split(train, query, database, protocol=protocol, seed=seed)


def split_imagenet100(
    database_labels: np.ndarray | Sequence[int],
    num_queries: int,
    n_train_per_class: int = 100,
    seed: int = 0,
    *,
    classes: Sequence[str] | None = None,
) -> Split:
    """ImageNet-100 protocol: database = the training-set list, queries = the separate
    validation list, ``n_train_per_class`` training items per class drawn from the database.

    Args:
        database_labels: int (N_db,) class index of every database item.
        num_queries: length of the query (validation) list; ``query`` is 0..num_queries-1
            and indexes that list (``separate_queries=True``).
        n_train_per_class: 100 in the paper.
        seed: seed of ``np.random.default_rng``.
        classes: class names, used in error messages.
    """
    labels = _single_labels(database_labels, "split_imagenet100")
    num_queries = _count(num_queries, "num_queries")
    n_train = _count(n_train_per_class, "n_train_per_class")
    rng = np.random.default_rng(seed)
    train_parts = []
    for class_index in np.unique(labels):
        members = np.flatnonzero(labels == class_index)
        if len(members) < n_train:
            raise ValueError(
                f"{_class_name(int(class_index), classes)} has {len(members)} database items "
                f"but the split draws {n_train} training items per class; lower "
                "n_train_per_class or add items to that class"
            )
        train_parts.append(rng.choice(members, size=n_train, replace=False))
    train = np.sort(np.concatenate(train_parts)) if train_parts else np.zeros(0, np.int64)
    return Split(
        train,
        np.arange(num_queries, dtype=np.int64),
        np.arange(len(labels), dtype=np.int64),
        protocol=f"imagenet100(n_train_per_class={n_train})",
        seed=seed,
        separate_queries=True,
    )


SOURCE_PROTOCOLS = ("per-class", "nus-wide")


def split_source(
    source: Source,
    protocol: str = "per-class",
    n_train: int = 500,
    n_query: int = 100,
    seed: int = 0,
    *,
    train_in_database: bool = False,
) -> Split:
    """A protocol split of a loaded source (``dpq data split``).

    Args:
        source: a :class:`~dpq.data.Source` (its labels are enough: ``labels_only=True``).
        protocol: "per-class" (:func:`split_per_class`: ``n_train`` and ``n_query`` items
            per class, single-label sources only) or "nus-wide" (:func:`split_nus_wide`:
            ``n_query`` random queries and ``n_train`` training items in all, for
            multi-label sources).
        n_train, n_query: the counts of the protocol.
        seed: seed of ``np.random.default_rng``.
        train_in_database: per-class: keep the training items in the database.
    """
    if protocol == "nus-wide":
        return split_nus_wide(len(source), n_query, n_train, seed=seed)
    if protocol != "per-class":
        raise ValueError(f"protocol must be one of {SOURCE_PROTOCOLS}; got {protocol!r}.")
    if source.is_multilabel:
        raise ValueError(
            f"{source.name} is multi-label: a per-class split needs one class per item; use "
            "--protocol nus-wide."
        )
    return split_per_class(
        source.labels,
        n_train,
        n_query,
        seed=seed,
        classes=source.classes,
        train_in_database=train_in_database,
    )
