"""One entry point for every labelled collection: :func:`load_source`.

Every command that reads data (``dpq train``, ``data info``, ``data split``, ``encode``,
``search``, ``evaluate``, ``reproduce``) and the Python API go through it, so a source that
one of them accepts, all of them accept. A source is:

- ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (no download);
- CIFAR-10: the official archive, its extracted folder, or a folder/zip with ``train/`` and
  ``test/`` class folders (kind ``"cifar10"``);
- a DVSQ/DPQ list file ending in .txt/.lst/.list, whose images live under ``image_root``
  (kind ``"list-file"``);
- any other folder or zip of ``<class>/<image>``, a user's own collection
  (kind ``"image-folder"``);
- precomputed features: ``load_source(features="x.npy", labels="y.npy")`` (kind
  ``"features"``).

Images of folders, zips and list files are decoded into memory up front
(``in_memory=True``), or read on demand (``in_memory=False``: ``inputs`` is an
:class:`~dpq.data.ImageFileReader`, decoded by the DataLoader workers of
:mod:`dpq.data.loading` while a model reads them), or either by size (``"auto"``: in
memory when the decoded images take at most :func:`memory_budget` bytes).
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpq.data.cifar10 import cifar10_reader, detect_cifar10_layout, load_cifar10
from dpq.data.dataset import ImageFileReader
from dpq.data.decode import SkippedImagesWarning, normalize_size
from dpq.data.digits import load_digits
from dpq.data.features import load_features
from dpq.data.folders import load_image_folder
from dpq.data.lists import load_list_file, read_list_file

LIST_SUFFIXES = (".txt", ".lst", ".list")
LOADING_CHOICES = ("auto", "memory", "stream")
DIGITS = "digits"
SOURCE_KINDS = ("digits", "cifar10", "list-file", "image-folder", "features")


def detect_source_kind(source: str | os.PathLike[str]) -> str:
    """``"digits"``, ``"cifar10"``, ``"list-file"`` or ``"image-folder"`` (see the module doc).

    Raises FileNotFoundError for a path that does not exist and ValueError for a file that
    is none of these.
    """
    if str(source) == DIGITS:
        return "digits"
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; give 'digits', a CIFAR-10 source, a folder or zip of "
            "<class>/<image>, or a list file"
        )
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return "list-file"
    if detect_cifar10_layout(path) is not None:
        return "cifar10"
    if path.is_dir() or zipfile.is_zipfile(path):
        return "image-folder"
    raise ValueError(
        f"cannot tell what {path} is: expected the CIFAR-10 archive, folder or zip, a folder "
        "or zip of <class>/<image>, or a list file ending in .txt"
    )


@dataclass(frozen=True)
class Source:
    """A labelled collection as loaded by :func:`load_source`.

    Attributes:
        inputs: uint8 (N, H, W, 3) images (an in-memory array, or an
            :class:`~dpq.data.ImageFileReader` that decodes on access), float32 (N, F)
            features for kind "features", or None when only labels were asked for.
        labels: int64 (N,) class indices in [0, C), or uint8 (N, C) multi-hot rows.
        classes: the C class names.
        kind: one of :data:`SOURCE_KINDS`.
        name: the source as given (for messages and metadata).
        skipped: images left out because they could not be decoded (``skip_corrupt``).
    """

    inputs: Any
    labels: np.ndarray
    classes: list[str]
    kind: str
    name: str
    skipped: int = 0
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def is_multilabel(self) -> bool:
        return self.labels.ndim == 2

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def rows(self, indices: np.ndarray) -> tuple[Any, np.ndarray]:
        """(inputs, labels) of the items at ``indices`` (int64 (n,)), in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        inputs = self.inputs
        if isinstance(inputs, ImageFileReader):
            return inputs.subset(indices), self.labels[indices]
        return inputs[indices], self.labels[indices]


def memory_budget() -> int:
    """Bytes of decoded images that ``in_memory="auto"`` keeps in memory: a quarter of the
    machine's physical memory, at most 8 GiB (``$DPQ_MEMORY_BUDGET_MB`` overrides it)."""
    override = os.environ.get("DPQ_MEMORY_BUDGET_MB", "").strip()
    if override.isdigit():
        return int(override) << 20
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        total = 8 << 30
    return int(min(total // 4, 8 << 30))


def loading_mode(loading: str) -> bool | str:
    """``--loading auto|memory|stream`` -> the ``in_memory`` argument of :func:`load_source`."""
    if loading not in LOADING_CHOICES:
        raise ValueError(f"--loading must be one of {', '.join(LOADING_CHOICES)}; got {loading!r}.")
    return {"auto": "auto", "memory": True, "stream": False}[loading]


def _fits_in_memory(reader: ImageFileReader) -> bool:
    height, width = reader.image_size
    return len(reader) * height * width * 3 <= memory_budget()


def load_source(
    spec: str | os.PathLike[str] | None = None,
    *,
    features: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    image_root: str | os.PathLike[str] | None = None,
    image_size: int | Sequence[int] | None = None,
    strip_prefix: str | None = None,
    skip_corrupt: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    labels_only: bool = False,
    in_memory: bool | str = True,
    progress: bool = True,
) -> Source:
    """Load any labelled collection (see the module doc).

    Args:
        spec: "digits", a CIFAR-10 source, a folder/zip of ``<class>/<image>`` or a list file.
        features, labels: instead of ``spec``: a float (N, F) .npy/.txt file and its labels.
        image_root: list files: the folder or zip holding the listed images.
        image_size: resize every image to this square size (int) or (height, width);
            needed for folders whose images differ in size; list files default to 256.
        strip_prefix: list files: the leading part of listed absolute paths to replace by
            ``image_root`` (default: found from the first line).
        skip_corrupt: leave out images that cannot be decoded (counted in ``skipped``)
            instead of stopping at the first one.
        cache_dir: where decoded CIFAR-10 arrays are cached.
        labels_only: only the labels are needed (``inputs`` is None where that saves work:
            a list file is parsed, its images are not read).
        in_memory: decode every image now (True), read images on demand (False: folders,
            zips and list files, which then need ``image_size``, and a CIFAR-10 folder or
            zip, at 32 px unless ``image_size`` says otherwise; the official CIFAR-10
            batches and digits stay in memory), or "auto": in memory when the decoded
            images fit :func:`memory_budget` (CIFAR-10's 180 MB always do), else on demand.
        progress: report decoding progress on stderr (``--quiet`` turns it off).

    Raises:
        ValueError: conflicting arguments (a source and ``features``), a list file without
            ``image_root``, an unreadable source; FileNotFoundError: a missing path.
    """
    if features is not None or labels is not None:
        if spec is not None:
            raise ValueError(
                f"give either a data source ({spec}) or --features with --labels, not both."
            )
        return _load_features(features, labels, image_root, image_size)
    if spec is None:
        raise ValueError("give a data source (a path, or 'digits') or --features with --labels.")
    if in_memory not in (True, False, "auto"):
        raise ValueError(f"in_memory must be True, False or 'auto'; got {in_memory!r}.")
    kind = detect_source_kind(spec)
    if kind != "list-file" and (image_root is not None or strip_prefix is not None):
        raise ValueError(
            f"--image-root and --strip-prefix apply to list files; {spec} is a {kind} source."
        )
    images = _ImageOptions(image_size, skip_corrupt, in_memory, labels_only, progress)
    if kind == "digits":
        dataset = load_digits()
        return Source(dataset.images, dataset.labels, list(dataset.classes), kind, DIGITS)
    if kind == "cifar10":
        return _load_cifar10(spec, images, cache_dir)
    if kind == "list-file":
        return _load_list_file(spec, images, image_root, strip_prefix)
    return _load_image_folder(spec, images)


@dataclass(frozen=True)
class _ImageOptions:
    """How :func:`load_source` reads an image source (its arguments of the same names)."""

    image_size: int | Sequence[int] | None
    skip_corrupt: bool
    in_memory: bool | str
    labels_only: bool
    progress: bool


def _load_features(
    features: str | os.PathLike[str] | None,
    labels: str | os.PathLike[str] | None,
    image_root: str | os.PathLike[str] | None,
    image_size: int | Sequence[int] | None,
) -> Source:
    """Kind "features": a float (N, F) array file and its labels file."""
    if features is None or labels is None:
        raise ValueError(
            "--features needs --labels (a .npy/.txt file with one label per row) and "
            "--labels needs --features."
        )
    if image_root is not None or image_size is not None:
        raise ValueError("--image-root and --image-size apply to image sources, not to --features.")
    loaded = load_features(features, labels)
    return Source(loaded.features, loaded.labels, list(loaded.classes), "features", str(features))


def _load_cifar10(
    spec: str | os.PathLike[str], images: _ImageOptions, cache_dir: str | os.PathLike[str] | None
) -> Source:
    """Kind "cifar10": 32 px arrays (cached), or a folder/zip read on demand."""
    in_memory, image_size = images.in_memory, images.image_size
    if in_memory is False and detect_cifar10_layout(spec) == "folder" and not images.labels_only:
        if images.skip_corrupt:
            raise ValueError(
                "--skip-corrupt decodes every image up front; it cannot read CIFAR-10 on "
                "demand (--loading stream). Use --loading memory."
            )
        read = cifar10_reader(spec, normalize_size(image_size or 32))  # type: ignore[arg-type]
        return Source(read.images, read.labels, list(read.classes), "cifar10", str(spec))
    if image_size is not None:
        raise ValueError(
            "CIFAR-10 images are 32 x 32 in memory; --image-size applies to other sources "
            "and to a CIFAR-10 folder or zip read on demand (--loading stream)."
        )
    return _decoded(
        "cifar10",
        spec,
        lambda: load_cifar10(
            spec,
            cache_dir=cache_dir,
            skip_corrupt=images.skip_corrupt,
            progress=images.progress,
        ),
    )


def _load_list_file(
    spec: str | os.PathLike[str],
    images: _ImageOptions,
    image_root: str | os.PathLike[str] | None,
    strip_prefix: str | None,
) -> Source:
    """Kind "list-file": the listed images under ``image_root`` (256 px unless told), or
    only the labels when ``labels_only`` comes without ``image_root``."""
    if image_root is None:
        if images.labels_only:
            return _list_file_labels(spec)
        raise ValueError(
            f"{spec} is a list file; pass --image-root, the folder or zip holding its images."
        )

    def loader(decode: bool) -> Any:
        return load_list_file(
            spec,
            image_root,
            image_size=images.image_size or 256,
            strip_prefix=strip_prefix,
            in_memory=decode,
            skip_corrupt=images.skip_corrupt,
            progress=images.progress,
        )

    if images.labels_only:  # the listing, its images not decoded
        return _decoded("list-file", spec, lambda: loader(False))
    return _decoded_or_on_demand("list-file", spec, loader, images.in_memory, images.skip_corrupt)


def _load_image_folder(spec: str | os.PathLike[str], images: _ImageOptions) -> Source:
    """Kind "image-folder": a folder or zip of ``<class>/<image>``."""

    def loader(decode: bool) -> Any:
        return load_image_folder(
            spec,
            image_size=images.image_size,
            skip_corrupt=images.skip_corrupt,
            in_memory=decode,
            progress=images.progress,
        )

    in_memory = images.in_memory
    if images.labels_only:
        return _decoded("image-folder", spec, lambda: loader(bool(in_memory)))
    if in_memory == "auto" and images.image_size is None:
        in_memory = True  # images of one size, read as they are: decoded up front
    return _decoded_or_on_demand("image-folder", spec, loader, in_memory, images.skip_corrupt)


def _decoded_or_on_demand(
    kind: str,
    spec: str | os.PathLike[str],
    loader: Callable[[bool], Any],
    in_memory: bool | str,
    skip_corrupt: bool,
) -> Source:
    """Folders, zips and list files: ``loader(True)`` decodes every image now,
    ``loader(False)`` reads them on demand; "auto" decodes when they fit the memory budget."""
    if in_memory is False and skip_corrupt:
        raise ValueError(
            "--skip-corrupt decodes every image up front to find the unreadable ones, so it "
            "cannot read images on demand (--loading stream); there, a corrupt image stops "
            "the run and names the file. Remove the unreadable files, or load into memory "
            "(--loading memory)."
        )
    if in_memory == "auto":
        lazy = loader(False)
        if not (skip_corrupt or _fits_in_memory(lazy.images)):
            return Source(lazy.images, lazy.labels, list(lazy.classes), kind, str(spec))
        in_memory = True
    return _decoded(kind, spec, lambda: loader(bool(in_memory)))


def _decoded(kind: str, spec: str | os.PathLike[str], load: Callable[[], Any]) -> Source:
    """The Source of ``load()``; its ``SkippedImagesWarning``s counted into ``skipped`` and
    ``notes`` and issued again, once each, in the caller's name."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedImagesWarning)
        dataset = load()
    skipped = 0
    notes = []
    for warning in caught:
        if isinstance(warning.message, SkippedImagesWarning):
            skipped += warning.message.count
            notes.append(str(warning.message))
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return Source(
        dataset.images, dataset.labels, list(dataset.classes), kind, str(spec), skipped, notes
    )


def _list_file_labels(spec: str | os.PathLike[str]) -> Source:
    """Labels of a list file without reading its images (class indices mapped to 0..C-1)."""
    list_file = read_list_file(spec)
    if list_file.is_multilabel:
        classes = [str(j) for j in range(list_file.labels.shape[1])]
        return Source(None, list_file.labels, classes, "list-file", str(spec))
    indices = list_file.class_indices
    mapped = np.searchsorted(indices, list_file.labels).astype(np.int64)
    return Source(None, mapped, [str(i) for i in indices], "list-file", str(spec))
