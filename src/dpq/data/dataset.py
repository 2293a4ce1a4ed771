"""The one dataset type every loader returns: images, labels and class names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dpq.data.decode import ImageStore, decode_image

IndexLike = int | slice | Sequence[int] | np.ndarray


class ImageFileReader:
    """Images read from files on demand, for collections too large to hold in memory.

    Behaves like a read-only uint8 array of shape (N, H, W, 3): ``len(reader)``,
    ``reader.shape``, ``reader[i]`` -> (H, W, 3), ``reader[indices]`` or
    ``reader[start:stop]`` -> (n, H, W, 3). Every image is converted to RGB and resized
    to ``image_size``. A file that cannot be decoded raises ``CorruptImageError`` (a
    ``ValueError``) naming it when it is read.
    """

    def __init__(self, store: ImageStore, names: Sequence[str], image_size: tuple[int, int]):
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(
                f"image_size must be (height, width) with positive sides, got {image_size!r}"
            )
        self.store = store
        self.names = list(names)
        self.image_size = (int(image_size[0]), int(image_size[1]))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, H, W, 3)."""
        return (len(self.names), self.image_size[0], self.image_size[1], 3)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    @property
    def ndim(self) -> int:
        return 4

    def _read(self, index: int) -> np.ndarray:
        name = self.names[index]
        return decode_image(self.store.read(name), self.store.describe(name), self.image_size)

    def _positions(self, key: slice | Sequence[int] | np.ndarray) -> Sequence[int] | np.ndarray:
        if isinstance(key, slice):
            return range(len(self))[key]
        positions = np.asarray(key)
        if positions.dtype == bool:
            if positions.shape != (len(self),):
                raise IndexError(f"boolean index of shape {positions.shape} for {len(self)} images")
            return np.flatnonzero(positions)
        if positions.size and not np.issubdtype(positions.dtype, np.integer):
            raise IndexError(f"image indices must be integers, got dtype {positions.dtype}")
        positions = positions.astype(np.int64, copy=False).reshape(-1)
        if positions.size and (positions.min() < -len(self) or positions.max() >= len(self)):
            raise IndexError(f"image index out of range for {len(self)} images")
        return positions % max(len(self), 1)

    def __getitem__(self, key: IndexLike) -> np.ndarray:
        if isinstance(key, int | np.integer):
            return self._read(range(len(self))[int(key)])
        positions = self._positions(key)
        out = np.empty((len(positions), *self.image_size, 3), dtype=np.uint8)
        for row, position in enumerate(positions):
            out[row] = self._read(int(position))
        return out

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageFileReader:
        """A reader over the images at ``indices`` (int64 (n,)), in that order."""
        positions = self._positions(np.asarray(indices, dtype=np.int64))
        return ImageFileReader(self.store, [self.names[p] for p in positions], self.image_size)

    def __repr__(self) -> str:
        return f"ImageFileReader({len(self)} images from {self.store.path}, size={self.image_size})"


class LabelledItems:
    """What every labelled collection answers: its size, class count and label kind.

    Needs ``labels`` (int64 (N,) class ids or multi-hot uint8 (N, C)) and ``classes``."""

    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_multilabel(self) -> bool:
        return self.labels.ndim == 2


@dataclass(frozen=True)
class ImageDataset(LabelledItems):
    """A labelled image collection.

    Attributes:
        images: uint8 (N, H, W, 3) array, or an ``ImageFileReader`` with the same
            indexing for collections read on demand.
        labels: int64 (N,) class indices in [0, C), or uint8 (N, C) multi-hot rows.
        classes: the C class names; ``labels`` index into it.
        source: where the images came from (for messages and reports).
    """

    images: np.ndarray | ImageFileReader
    labels: np.ndarray
    classes: list[str]
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        images = self.images
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(
                    f"images must be a uint8 array of shape (N, H, W, 3), got {images.dtype} "
                    f"{images.shape}; convert with np.asarray(images, dtype=np.uint8) and stack "
                    "gray images to three channels"
                )
        elif not isinstance(images, ImageFileReader):
            raise ValueError(
                f"images must be a numpy array or an ImageFileReader, got {type(images).__name__}"
            )
        labels = np.asarray(self.labels)
        classes = [str(name) for name in self.classes]
        if labels.ndim == 1:
            if labels.size and not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"single-label labels must be integers, got dtype {labels.dtype}")
            labels = labels.astype(np.int64, copy=False)
            if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
                raise ValueError(
                    f"labels must lie in [0, {len(classes)}) for {len(classes)} classes, got "
                    f"values from {labels.min()} to {labels.max()}; pass one name per class"
                )
        elif labels.ndim == 2:
            if labels.shape[1] != len(classes):
                raise ValueError(
                    f"multi-hot labels have {labels.shape[1]} columns but {len(classes)} class "
                    "names were given; pass one name per column"
                )
            if labels.size and not np.isin(labels, (0, 1)).all():
                raise ValueError("multi-hot labels must contain only 0 and 1")
            labels = labels.astype(np.uint8, copy=False)
        else:
            raise ValueError(
                f"labels must be int64 (N,) or multi-hot (N, C), got shape {labels.shape}"
            )
        if len(labels) != len(images):
            raise ValueError(
                f"{len(images)} images but {len(labels)} labels; give one label row per image"
            )
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "classes", classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, 3)."""
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def class_counts(self) -> np.ndarray:
        """int64 (C,): images per class (for multi-label: images carrying each label)."""
        if self.is_multilabel:
            return self.labels.sum(axis=0, dtype=np.int64)
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """The items at ``indices`` (int64 (n,)), e.g. ``dataset.subset(split.train)``."""
        indices = np.asarray(indices, dtype=np.int64)
        if isinstance(self.images, ImageFileReader):
            images: np.ndarray | ImageFileReader = self.images.subset(indices)
        else:
            images = self.images[indices]
        return ImageDataset(images, self.labels[indices], list(self.classes), self.source)
