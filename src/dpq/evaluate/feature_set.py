"""A feature set: query, database and (optionally) training features with their labels,
checked once, read from .npy files or a features directory. Every evaluation of
:mod:`dpq.evaluate.retrieval` scores its methods on one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

METRICS = ("l2", "ip")
FEATURE_FILES = {
    "query_features": "query_features.npy",
    "query_labels": "query_labels.npy",
    "db_features": "db_features.npy",
    "db_labels": "db_labels.npy",
    "train_features": "train_features.npy",
    "train_labels": "train_labels.npy",
}


@dataclass(frozen=True)
class FeatureSet:
    """Query / database / (optional) training features with their labels.

    Features are float (n, D); labels int (n,) class ids or multi-hot (n, C). Database
    features may be None when only an index (which holds its own codes) is evaluated.
    ``metric`` is how the features compare: "l2" (squared Euclidean, the default) or "ip"
    (inner product, larger is closer: class-posterior features); it decides how exact float
    search and the quantization baselines rank (the hashing baselines rank by Hamming
    distance either way; an index ranks by its own search).
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
