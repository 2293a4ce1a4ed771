"""Precomputed features for the feature-only path (no images, no backbone)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpq.data.dataset import LabelledItems


@dataclass(frozen=True)
class FeatureDataset(LabelledItems):
    """Features with their labels.

    Attributes:
        features: float32 (N, D).
        labels: int64 (N,) class indices, or uint8 (N, C) multi-hot rows.
        classes: the C class names (the class indices as strings unless given).
    """

    features: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str = field(default="", compare=False)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


MAX_CLASSES = 100_000
"""More distinct labels than this is taken for a mistake (a column of ids, not classes)."""


def read_array(path: str | os.PathLike[str], what: str) -> np.ndarray:
    """The one reader of array files: a .npy array (never unpickled), or numbers in a
    .txt/.csv/.tsv file.

    Raises FileNotFoundError when absent and ValueError, naming ``what`` and the file, for a
    directory, an .npz archive, an object (pickled) array, or text that is not numbers.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; pass the array file (.npy or .txt)")
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".csv", ".tsv"):
        try:
            return np.loadtxt(path, delimiter="," if suffix == ".csv" else None, ndmin=1)
        except (ValueError, UnicodeDecodeError) as exc:
            first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise ValueError(
                f"cannot read {what} file {path} as numbers ({first}); write one row of numbers "
                "per item"
            ) from None
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(
            f"cannot read {what} file {path} as a plain .npy array ({exc}); save it with "
            "np.save(path, array) from a numeric array (object arrays are refused)"
        ) from None
    except (OSError, EOFError) as exc:
        raise ValueError(
            f"{what} file {path} is not a .npy array ({exc}); save it with np.save(path, array)"
        ) from None
    if not isinstance(loaded, np.ndarray):  # an .npz archive (whatever its name)
        loaded.close()
        raise ValueError(
            f"{what} file {path} is an .npz archive, not one .npy array; save the array alone "
            "with np.save(path, array)"
        )
    return loaded


def read_labels(path: str | os.PathLike[str], what: str = "labels") -> np.ndarray:
    """Labels from a .npy/.txt file: int64 (N,) class ids or uint8 (N, C) 0/1 rows.

    Numbers written as text ("3.0") are accepted when they are whole; anything else is a
    ValueError naming the file.
    """
    labels = read_array(path, what)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dtype != np.bool_ and not _is_real(labels):
        raise ValueError(
            f"{what} in {path} must be integer class indices or 0/1 rows, got {labels.dtype} "
            "values; map class names to 0..C-1 first"
        )
    if labels.size and not (np.isfinite(labels).all() and np.all(labels == np.round(labels))):
        raise ValueError(f"{what} in {path} must be integers")
    if labels.ndim == 1:
        return labels.astype(np.int64)
    if labels.ndim == 2:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"multi-hot {what} in {path} must contain only 0 and 1")
        return labels.astype(np.uint8)
    raise ValueError(f"{what} in {path} must be (N,) or (N, C), got shape {labels.shape}")


def check_class_labels(labels: np.ndarray, where: str) -> tuple[np.ndarray, list[str]]:
    """Integer class labels int (N,) -> (int64 labels in 0..C-1, C class names).

    Dense labels 0..C-1 keep their values (names "0".."C-1"); any other set of non-negative
    values is mapped to 0..C-1 in increasing order, the original values becoming the names.
    Raises ValueError for negative values or more than :data:`MAX_CLASSES` distinct ones.
    """
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels in {where} must be non-negative class indices")
    values = np.unique(labels)
    if values.size > MAX_CLASSES:
        raise ValueError(
            f"labels in {where} hold {values.size:,} distinct values; more than {MAX_CLASSES:,} "
            "classes is not a classification (are these item ids?)"
        )
    if values.size == 0 or (values[0] == 0 and values[-1] == values.size - 1):
        return labels.astype(np.int64), [str(c) for c in range(values.size)]
    mapped = np.searchsorted(values, labels).astype(np.int64)
    return mapped, [str(int(v)) for v in values]


def load_features(
    npy_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    classes: list[str] | None = None,
) -> FeatureDataset:
    """Load float features (N, D) and their labels.

    Args:
        npy_path: a .npy (or .txt/.csv) file holding an (N, D) numeric array.
        labels_path: a .npy (or .txt/.csv) file holding int (N,) class indices or 0/1
            (N, C) multi-hot rows. Class indices that are not 0..C-1 are mapped to 0..C-1
            in increasing order (the original values become the class names).
        classes: class names (default: the class indices as strings).

    Returns features float32 (N, D) and labels int64 (N,) or uint8 (N, C). Never unpickles.
    """
    features = read_array(npy_path, "features")
    if features.ndim != 2 or not _is_real(features):
        raise ValueError(
            f"features in {npy_path} must be a numeric (N, D) array, got {features.dtype} "
            f"{features.shape}; reshape to one row per item"
        )
    features = features.astype(np.float32, copy=False)
    if not np.isfinite(features).all():
        raise ValueError(f"features in {npy_path} contain NaN or infinite values; clean them first")
    labels = read_labels(labels_path)
    if len(labels) != len(features):
        raise ValueError(
            f"{npy_path} has {len(features)} feature rows but {labels_path} has {len(labels)} "
            "labels; give one label (row) per feature row"
        )
    if labels.ndim == 1:
        labels, names = check_class_labels(labels, str(labels_path))
    else:
        names = [str(c) for c in range(labels.shape[1])]
    if classes is not None:
        if len(classes) != len(names):
            raise ValueError(
                f"{len(classes)} class names given but the labels need {len(names)}; pass one "
                "per class"
            )
        names = list(classes)
    return FeatureDataset(features, labels, names, str(npy_path))


def _is_real(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.number) and not np.issubdtype(
        array.dtype, np.complexfloating
    )
