"""Precomputed features for the feature-only path (no images, no backbone)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class FeatureDataset:
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

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_multilabel(self) -> bool:
        return self.labels.ndim == 2

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def _load_array(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(
                f"cannot read {what} file {path} as a plain .npy array ({exc}); save it with "
                "np.save(path, array) from a numeric array (object arrays are refused)"
            ) from exc
    if path.suffix in (".txt", ".csv", ".tsv"):
        try:
            return np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=1)
        except ValueError as exc:
            raise ValueError(f"cannot read {what} file {path} as numbers: {exc}") from exc
    raise ValueError(f"{what} file {path} must be .npy, .txt, .csv or .tsv, got {path.suffix!r}")


def load_features(
    npy_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    classes: list[str] | None = None,
) -> FeatureDataset:
    """Load float features (N, D) and their labels.

    Args:
        npy_path: a .npy (or .txt/.csv) file holding an (N, D) numeric array.
        labels_path: a .npy (or .txt/.csv) file holding int (N,) class indices or 0/1
            (N, C) multi-hot rows.
        classes: class names (default: '0'..'C-1').

    Returns features float32 (N, D) and labels int64 (N,) or uint8 (N, C). Never unpickles.
    """
    features = _load_array(Path(npy_path), "features")
    labels = _load_array(Path(labels_path), "labels")
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.number):
        raise ValueError(
            f"features in {npy_path} must be a numeric (N, D) array, got {features.dtype} "
            f"{features.shape}; reshape to one row per item"
        )
    features = features.astype(np.float32, copy=False)
    if not np.isfinite(features).all():
        raise ValueError(f"features in {npy_path} contain NaN or infinite values; clean them first")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if len(labels) != len(features):
        raise ValueError(
            f"{npy_path} has {len(features)} feature rows but {labels_path} has {len(labels)} "
            "labels; give one label (row) per feature row"
        )
    if labels.size and not np.all(labels == np.round(labels)):
        raise ValueError(f"labels in {labels_path} must be integers")
    if labels.ndim == 1:
        labels = labels.astype(np.int64)
        if labels.size and labels.min() < 0:
            raise ValueError(f"labels in {labels_path} must be non-negative class indices")
        num_classes = int(labels.max()) + 1 if labels.size else 0
    elif labels.ndim == 2:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"multi-hot labels in {labels_path} must contain only 0 and 1")
        labels = labels.astype(np.uint8)
        num_classes = labels.shape[1]
    else:
        raise ValueError(f"labels in {labels_path} must be (N,) or (N, C), got {labels.shape}")
    names = [str(c) for c in range(num_classes)] if classes is None else list(classes)
    if len(names) < num_classes or (labels.ndim == 2 and len(names) != num_classes):
        raise ValueError(
            f"{len(names)} class names given but the labels need {num_classes}; pass one per class"
        )
    return FeatureDataset(features, labels, names, str(npy_path))
