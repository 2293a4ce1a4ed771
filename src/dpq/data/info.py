"""What is in a data source: kind, counts per class, image size, protocol split sizes.

Backs ``dpq data info SOURCE``. The kind of source is detected:
- ``cifar10``: the official archive, its extracted folder, or a folder/zip with ``train/``
  and ``test/`` class folders;
- ``list-file``: a ``.txt`` (or ``.lst``/``.list``) DVSQ/DPQ list file;
- ``image-folder``: any other folder or zip of ``<class>/<image>``.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dpq.data.cifar10 import detect_cifar10_layout, load_cifar10
from dpq.data.decode import ImageStore
from dpq.data.folders import load_image_folder
from dpq.data.lists import read_list_file, resolve_image_names
from dpq.data.splits import split_imagenet100, split_nus_wide, split_per_class

LIST_SUFFIXES = (".txt", ".lst", ".list")
CIFAR10_TRAIN_PER_CLASS = 500
CIFAR10_QUERY_PER_CLASS = 100


def detect_source_kind(source: str | os.PathLike[str]) -> str:
    """'cifar10', 'list-file' or 'image-folder' (see the module doc)."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
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
class DatasetInfo:
    """Summary of a data source.

    Attributes:
        counts: int64 (C,) images per class (multi-label: images carrying each label).
        image_shape: (H, W, 3) as loaded, or None when the images were not found.
        split_sizes: {'train', 'query', 'database'} sizes of the benchmark protocol split,
            or None when the source has no protocol.
    """

    source: str
    kind: str
    num_images: int
    classes: list[str]
    counts: np.ndarray
    is_multilabel: bool
    image_shape: tuple[int, ...] | None
    split_sizes: dict[str, int] | None
    split_rule: str
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        """The human-readable report printed by ``dpq data info``."""
        kind_names = {
            "cifar10": "CIFAR-10",
            "list-file": "list file",
            "image-folder": "image folder",
        }
        lines = [
            f"source: {self.source} ({kind_names.get(self.kind, self.kind)})",
            f"images: {self.num_images:,}",
            f"classes: {len(self.classes)}" + (" (multi-label)" if self.is_multilabel else ""),
        ]
        if self.image_shape is not None:
            lines.append("image size: " + " x ".join(str(s) for s in self.image_shape) + " (uint8)")
        else:
            lines.append("image size: unknown (images not read)")
        heading = (
            "images per label (an image may carry several):"
            if self.is_multilabel
            else ("images per class:")
        )
        lines.append(heading)
        width = max((len(name) for name in self.classes), default=0)
        for name, count in zip(self.classes, self.counts, strict=True):
            lines.append(f"  {name:<{width}}  {int(count):>9,}")
        if self.split_sizes is not None:
            sizes = self.split_sizes
            lines.append(
                f"protocol split ({self.split_rule}): train {sizes['train']:,} / "
                f"query {sizes['query']:,} / database {sizes['database']:,}"
            )
        else:
            lines.append(f"protocol split: {self.split_rule}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def describe_source(
    source: str | os.PathLike[str],
    *,
    skip_corrupt: bool = False,
    image_size: int | Sequence[int] | None = None,
    root: str | os.PathLike[str] | None = None,
    strip_prefix: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> DatasetInfo:
    """Load (or, for a list file, parse) ``source`` and summarise it.

    CIFAR-10 and image folders are loaded in full (CIFAR-10 through the decoded-array
    cache); a list file is parsed, and with ``root`` its first image is read for its size.
    """
    kind = detect_source_kind(source)
    if kind == "cifar10":
        dataset = load_cifar10(source, cache_dir=cache_dir, skip_corrupt=skip_corrupt)
        rule = (
            f"CIFAR-10: {CIFAR10_TRAIN_PER_CLASS} training + {CIFAR10_QUERY_PER_CLASS} query "
            f"per class, database the rest, seed {seed}"
        )
        try:
            split_sizes: dict[str, int] | None = split_per_class(
                dataset.labels,
                CIFAR10_TRAIN_PER_CLASS,
                CIFAR10_QUERY_PER_CLASS,
                seed=seed,
                classes=dataset.classes,
            ).sizes
        except ValueError as exc:
            split_sizes, rule = None, f"{rule}: not applicable here ({exc})"
        return DatasetInfo(
            str(source),
            kind,
            len(dataset),
            dataset.classes,
            dataset.class_counts(),
            False,
            dataset.image_shape,
            split_sizes,
            rule,
        )
    if kind == "image-folder":
        dataset = load_image_folder(source, image_size=image_size, skip_corrupt=skip_corrupt)
        return DatasetInfo(
            str(source),
            kind,
            len(dataset),
            dataset.classes,
            dataset.class_counts(),
            False,
            dataset.image_shape,
            None,
            "none for a custom collection; make one with "
            "dpq.data.splits.split_per_class(labels, n_train, n_query, seed)",
        )
    return _describe_list_file(Path(source), root, strip_prefix, image_size, seed)


def source_labels(
    source: str | os.PathLike[str],
    *,
    skip_corrupt: bool = False,
    image_size: int | Sequence[int] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """(labels, class names) of any source ``detect_source_kind`` knows.

    Images are loaded for CIFAR-10 and image folders (undecodable ones change the item
    list, so they matter); a list file is only parsed. Labels are int64 (N,) or uint8
    (N, C) multi-hot; list-file class indices are mapped to 0..C-1 (see ``dpq.data.lists``).
    """
    kind = detect_source_kind(source)
    if kind == "cifar10":
        dataset = load_cifar10(source, cache_dir=cache_dir, skip_corrupt=skip_corrupt)
        return dataset.labels, dataset.classes
    if kind == "image-folder":
        dataset = load_image_folder(source, image_size=image_size, skip_corrupt=skip_corrupt)
        return dataset.labels, dataset.classes
    list_file = read_list_file(source)
    if list_file.is_multilabel:
        return list_file.labels, [str(j) for j in range(list_file.labels.shape[1])]
    indices = list_file.class_indices
    return np.searchsorted(indices, list_file.labels).astype(np.int64), [str(i) for i in indices]


def _describe_list_file(
    path: Path,
    root: str | os.PathLike[str] | None,
    strip_prefix: str | None,
    image_size: int | Sequence[int] | None,
    seed: int,
) -> DatasetInfo:
    list_file = read_list_file(path)
    notes: list[str] = []
    if list_file.is_multilabel:
        counts = list_file.labels.sum(axis=0, dtype=np.int64)
        classes = [str(j) for j in range(list_file.labels.shape[1])]
        try:
            split_sizes: dict[str, int] | None = split_nus_wide(len(list_file), seed=seed).sizes
            rule = "NUS-WIDE: 5,000 queries, database the rest, 10,000 training from the database"
        except ValueError:
            split_sizes = None
            rule = (
                "NUS-WIDE protocol needs at least 15,000 items (5,000 queries + 10,000 "
                "training); this list is one of its parts"
            )
        unlabeled = int((list_file.labels.sum(axis=1) == 0).sum())
        if unlabeled:
            notes.append(f"{unlabeled:,} items carry no label")
    else:
        indices, counts = np.unique(list_file.labels, return_counts=True)
        counts = counts.astype(np.int64)
        classes = [str(i) for i in indices]
        mapped = np.searchsorted(indices, list_file.labels)
        try:
            split_sizes = split_imagenet100(mapped, 0, seed=seed).sizes
            rule = (
                "ImageNet-100, taking this list as the database: 100 training per class; "
                "queries come from the separate validation list"
            )
        except ValueError as exc:
            split_sizes = None
            rule = f"ImageNet-100 protocol not applicable to this list as a database ({exc})"
        notes.append("labels are the original class indices, shown in increasing order")
    image_shape = None
    if root is not None:
        store = ImageStore(os.fspath(root))
        names = resolve_image_names(list_file, store, strip_prefix)
        with Image.open(io.BytesIO(store.read(names[0]))) as first:
            width, height = first.size
        notes.append(f"first image {store.describe(names[0])} is {width}x{height} (width x height)")
        if image_size is not None:
            size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
            image_shape = (int(size[0]), int(size[1]), 3)
            notes.append("images are resized to the image size when read")
        else:
            image_shape = (height, width, 3)
    else:
        notes.append("images not read (pass --root, the folder or zip that holds them)")
    return DatasetInfo(
        str(path),
        "list-file",
        len(list_file),
        classes,
        counts,
        list_file.is_multilabel,
        image_shape,
        split_sizes,
        rule,
        notes,
    )
