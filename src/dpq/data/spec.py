"""How a source is read, as one JSON-ready value: :class:`SourceSpec`.

The options every command and worker needs to open the same items (the arguments of
:func:`~dpq.data.load_source`) travel together: ``spec.load()`` gives the labelled
:class:`~dpq.data.Source`, ``spec.open()`` the inputs of an encoder (where a features file
may come without labels), and ``to_json`` / ``from_json`` carry the description to another
process (a Ray actor, a saved encoding plan) that opens the same items there.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from dpq.data.features import read_array, read_labels
from dpq.data.sources import LOADING_CHOICES, Source, load_source, loading_mode

_PATHS = ("images", "features", "labels", "image_root", "cache_dir")
_IMAGE_OPTIONS = {
    "image_root": "--image-root",
    "image_size": "--image-size",
    "strip_prefix": "--strip-prefix",
    "skip_corrupt": "--skip-corrupt",
}


@dataclass(frozen=True)
class SourceSpec:
    """One source and how to read it (give exactly one of ``images`` and ``features``).

    Attributes:
        images: an image collection, any :func:`~dpq.data.load_source` spec: "digits", a
            CIFAR-10 source, a folder or zip of ``<class>/<image>``, a list file.
        features: instead of ``images``: a float (N, F) .npy/.txt file, one row per item.
        labels: with ``features``: int (N,) or multi-hot (N, C) labels (.npy/.txt).
        image_root, image_size, strip_prefix, skip_corrupt, cache_dir: as in
            ``load_source`` (image sources only; ``image_size`` an int or (height, width)).
        loading: "auto", "memory" or "stream" (``--loading``): decode images up front, read
            them on demand, or either by size.
    """

    images: str | None = None
    features: str | None = None
    labels: str | None = None
    image_root: str | None = None
    image_size: int | tuple[int, int] | None = None
    strip_prefix: str | None = None
    skip_corrupt: bool = False
    cache_dir: str | None = None
    loading: str = "auto"

    def __post_init__(self) -> None:
        for name in _PATHS:
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
            elif value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a path (str); got {type(value).__name__}.")
        if isinstance(self.image_size, list):
            object.__setattr__(self, "image_size", tuple(self.image_size))
        if (self.images is None) == (self.features is None):
            both = ", not both" if self.images is not None else ""
            raise ValueError(
                f"give exactly one of images (a data source) and features (an array file){both}."
            )
        if self.labels is not None and self.features is None:
            raise ValueError(
                "a labels file goes with features; an image source brings its own labels."
            )
        if self.features is not None:
            given = [flag for name, flag in _IMAGE_OPTIONS.items() if getattr(self, name)]
            if given:
                raise ValueError(
                    f"{', '.join(given)} apply to --images (an image source), not to --features."
                )
        if self.loading not in LOADING_CHOICES:
            raise ValueError(
                f"loading must be one of {', '.join(LOADING_CHOICES)}; got {self.loading!r}."
            )

    # ---- the description

    def describe(self) -> str:
        """The source as given (for messages and index metadata)."""
        return str(self.images if self.images is not None else self.features)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``image_size`` a list when it is a pair)."""
        data = asdict(self)
        if isinstance(self.image_size, tuple):
            data["image_size"] = list(self.image_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceSpec:
        """The spec of :meth:`to_dict`; ValueError naming unknown fields."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown source option(s) {', '.join(unknown)}; a source spec has "
                f"{', '.join(sorted(known))}."
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SourceSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"a source spec must be a JSON object; cannot parse it: {exc}"
            ) from None
        if not isinstance(data, dict):
            raise ValueError(f"a source spec must be a JSON object; got {type(data).__name__}.")
        return cls.from_dict(data)

    # ---- reading

    def load(self, progress: bool = True, labels_only: bool = False) -> Source:
        """The labelled collection: :func:`~dpq.data.load_source` with these options (a
        features source needs ``labels``)."""
        return load_source(
            self.images,
            features=self.features,
            labels=self.labels,
            image_root=self.image_root,
            image_size=self.image_size,
            strip_prefix=self.strip_prefix,
            skip_corrupt=self.skip_corrupt,
            cache_dir=self.cache_dir,
            labels_only=labels_only,
            in_memory=loading_mode(self.loading),
            progress=progress,
        )

    def open(self, progress: bool = True) -> tuple[Any, np.ndarray | None, list[str] | None]:
        """(inputs, labels, classes) for an encoder, every row in source order.

        An image source gives what :meth:`load` gives. A features source gives the float
        (N, F) rows, memory-mapped from a plain .npy, with the labels file read as it is
        (int64 (N,) or uint8 (N, C)) or None without one, and classes None.
        """
        if self.images is not None:
            source = self.load(progress=progress)
            return source.inputs, source.labels, source.classes
        labels = None if self.labels is None else read_labels(self.labels, "--labels")
        return _feature_rows(Path(self.features)), labels, None  # type: ignore[arg-type]


def _feature_rows(path: Path) -> np.ndarray:
    """A plain .npy memory-mapped (rows read as they are used), anything else read whole."""
    if path.suffix.lower() == ".npy" and path.is_file():
        try:
            mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError:
            mapped = None  # not a plain array: read_array says why
        if isinstance(mapped, np.ndarray):
            return mapped
        if mapped is not None:
            mapped.close()  # an .npz archive named .npy: read_array says why
    return read_array(path, "--features")
