"""What is in a data source: kind, counts per class, image size, protocol split sizes.

Backs ``dpq data info SOURCE``; any source :func:`dpq.data.load_source` reads.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dpq.data.decode import ImageStore
from dpq.data.lists import read_list_file, resolve_image_names
from dpq.data.sources import detect_source_kind, load_source
from dpq.data.splits import split_imagenet100, split_nus_wide, split_per_class

CIFAR10_TRAIN_PER_CLASS = 500
CIFAR10_QUERY_PER_CLASS = 100


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
            "digits": "scikit-learn digits",
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
    progress: bool = True,
) -> DatasetInfo:
    """Load (or, for a list file, parse) ``source`` and summarise it.

    Digits, CIFAR-10 and image folders are loaded in full through
    :func:`dpq.data.load_source` (CIFAR-10 through the decoded-array cache); a list file is
    parsed, and with ``root`` its first image is read for its size.
    """
    kind = detect_source_kind(source)
    if kind == "list-file":
        return _describe_list_file(Path(source), root, strip_prefix, image_size, seed)
    loaded = load_source(
        source,
        image_root=root,
        image_size=image_size,
        strip_prefix=strip_prefix,
        skip_corrupt=skip_corrupt,
        cache_dir=cache_dir,
        progress=progress,
    )
    counts = np.bincount(loaded.labels, minlength=loaded.num_classes).astype(np.int64)
    image_shape = tuple(int(s) for s in loaded.inputs.shape[1:])
    notes = [f"{loaded.skipped:,} images could not be decoded and were skipped"] * bool(
        loaded.skipped
    )
    split_sizes: dict[str, int] | None = None
    rule = (
        "none for a custom collection; make one with `dpq data split SOURCE "
        "--train-per-class N --query-per-class M --out split.json`"
    )
    if kind == "cifar10":
        rule = (
            f"CIFAR-10: {CIFAR10_TRAIN_PER_CLASS} training + {CIFAR10_QUERY_PER_CLASS} query "
            f"per class, database the rest, seed {seed}"
        )
        try:
            split_sizes = split_per_class(
                loaded.labels,
                CIFAR10_TRAIN_PER_CLASS,
                CIFAR10_QUERY_PER_CLASS,
                seed=seed,
                classes=loaded.classes,
            ).sizes
        except ValueError as exc:
            rule = f"{rule}: not applicable here ({exc})"
    return DatasetInfo(
        str(source),
        kind,
        len(loaded),
        loaded.classes,
        counts,
        False,
        image_shape,
        split_sizes,
        rule,
        notes,
    )


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
