"""DVSQ/DPQ list files: one image per line, ``<path> <labels>``.

Two formats, told apart by the number of label columns (the same on every line):
- ``<path> <class index>`` (ImageNet-100): one integer per line. The indices are the
  original ones (ImageNet-1k, e.g. 0..999); they are mapped to 0..C-1 in increasing order
  of the original index, and ``classes`` holds the original indices as strings. Pass the
  same ``class_indices`` when loading the query and database lists of one benchmark so
  both use one mapping even if a class is missing from one of them.
- ``<path> <C binary labels>`` (NUS-WIDE-21, C = 21): multi-label, loaded as uint8 (N, C)
  multi-hot rows.

Image paths: a relative path is taken relative to ``root``. The published lists hold
absolute paths on the authors' disks (``/home/zhuxiaosu/nus/Flickr/<concept>/<file>``), so
for absolute paths a prefix is replaced by ``root``: ``strip_prefix`` when given, otherwise
the shortest leading part of the first absolute path whose remainder exists under ``root``
(``/home/zhuxiaosu/nus/Flickr/`` when ``root`` holds ``<concept>/<file>``). That one prefix
is then stripped from every line. ``root`` may also be a zip file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpq.data.dataset import ImageDataset, ImageFileReader
from dpq.data.decode import ImageStore, decode_many, normalize_size


@dataclass(frozen=True)
class ListFile:
    """The parsed content of a list file (no image is touched).

    Attributes:
        path: the list file.
        image_paths: the image path of every line, as written.
        labels: int64 (N,) original class indices, or uint8 (N, C) multi-hot rows.
        line_numbers: int64 (N,) 1-based line number of every entry (blank lines skipped).
    """

    path: str
    image_paths: list[str]
    labels: np.ndarray
    line_numbers: np.ndarray

    @property
    def is_multilabel(self) -> bool:
        return self.labels.ndim == 2

    @property
    def class_indices(self) -> np.ndarray:
        """int64 (C,): the distinct original class indices, increasing (single-label)."""
        if self.is_multilabel:
            return np.arange(self.labels.shape[1], dtype=np.int64)
        return np.unique(self.labels)

    def __len__(self) -> int:
        return len(self.image_paths)


_FORMAT_HINT = (
    "each line must be '<path> <class index>' or '<path> <C binary labels>' with the same "
    "number of labels on every line"
)


def read_list_file(list_path: str | os.PathLike[str]) -> ListFile:
    """Parse a list file; raises ``ValueError`` naming the first bad line."""
    path = Path(list_path)
    if not path.is_file():
        raise FileNotFoundError(f"list file {path} does not exist")
    image_paths: list[str] = []
    tokens: list[str] = []
    line_numbers: list[int] = []
    width = None
    first_line = 0
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ValueError(
                    f"line {number} of {path} has no labels: {line.strip()!r}; {_FORMAT_HINT}"
                )
            if width is None:
                width, first_line = len(parts) - 1, number
            elif len(parts) - 1 != width:
                raise ValueError(
                    f"line {number} of {path} has {len(parts) - 1} label columns but line "
                    f"{first_line} has {width}; {_FORMAT_HINT}. Fix or remove that line"
                )
            image_paths.append(parts[0])
            tokens.extend(parts[1:])
            line_numbers.append(number)
    if width is None:
        raise ValueError(f"list file {path} is empty; {_FORMAT_HINT}")
    values = _parse_label_tokens(tokens, width, line_numbers, path)
    labels = values if width == 1 else values.reshape(-1, width).astype(np.uint8)
    return ListFile(str(path), image_paths, labels, np.asarray(line_numbers, dtype=np.int64))


def _parse_label_tokens(
    tokens: list[str], width: int, line_numbers: list[int], path: Path
) -> np.ndarray:
    """int64 (N * width,) from the label tokens; ``ValueError`` naming the first bad line."""
    try:
        values = np.asarray(tokens).astype(np.int64)
        valid = bool(np.isin(values, (0, 1)).all()) if width > 1 else bool(values.min() >= 0)
    except ValueError:
        valid = False
    if valid:
        return values
    expected = "0/1 labels" if width > 1 else "a non-negative integer class index"
    for row, number in enumerate(line_numbers):
        row_tokens = tokens[row * width : (row + 1) * width]
        if width > 1:
            bad = any(token not in ("0", "1") for token in row_tokens)
        else:
            bad = not row_tokens[0].removeprefix("+").isdigit()
        if bad:
            raise ValueError(
                f"line {number} of {path} has labels {' '.join(row_tokens)!r}, expected "
                f"{expected}; {_FORMAT_HINT}"
            )
    raise ValueError(f"{path} has labels that are not {expected}; {_FORMAT_HINT}")


def resolve_image_names(
    list_file: ListFile, store: ImageStore, strip_prefix: str | None = None
) -> list[str]:
    """The name of every listed image inside ``store`` (see the module doc for the rule)."""
    prefix = None if strip_prefix is None else strip_prefix.rstrip("/") + "/"
    if prefix is None:
        first_absolute = next((p for p in list_file.image_paths if p.startswith("/")), None)
        if first_absolute is not None:
            parts = first_absolute.strip("/").split("/")
            for k in range(len(parts)):
                if store.exists("/".join(parts[k:])):
                    prefix = "/" + "".join(part + "/" for part in parts[:k])
                    break
            else:
                raise FileNotFoundError(
                    f"cannot place {first_absolute} (line {list_file.line_numbers[0]} of "
                    f"{list_file.path}) under {store.path}: no trailing part of the path exists "
                    "there. Pass strip_prefix (CLI: --strip-prefix), the leading part of the "
                    "listed paths to replace by root"
                )
    names = []
    for image_path, number in zip(list_file.image_paths, list_file.line_numbers, strict=True):
        if prefix is not None and image_path.startswith(prefix):
            names.append(image_path[len(prefix) :])
        elif image_path.startswith("/"):
            raise ValueError(
                f"line {number} of {list_file.path}: {image_path} does not start with "
                f"{prefix!r}, the prefix replaced by root; pass strip_prefix for such paths"
            )
        else:
            names.append(image_path.removeprefix("./"))
    return names


def load_list_file(
    list_path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    image_size: int | Sequence[int] = 256,
    *,
    strip_prefix: str | None = None,
    class_indices: Sequence[int] | np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    check_files: bool = True,
    in_memory: bool = False,
    skip_corrupt: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> ImageDataset:
    """Load a DVSQ/DPQ list file whose images live under ``root`` (a folder or zip).

    Args:
        list_path: the list file.
        root: folder or zip holding the images (see the module doc for the path rule).
        image_size: every image is resized to it (int or (height, width)); default 256,
            the size the paper used.
        strip_prefix: leading part of the listed absolute paths to replace by ``root``.
        class_indices: the original class indices, in label order (single-label lists);
            default: the distinct indices of this file, increasing.
        class_names: names for the classes (default: the original indices, or the
            column numbers for multi-label lists).
        check_files: check that every listed image exists (raises ``FileNotFoundError``).
        in_memory: decode every image now; otherwise ``images`` is an ``ImageFileReader``
            that decodes on access.
        skip_corrupt: with ``in_memory``, skip undecodable images with a warning.
        workers: decoding threads with ``in_memory`` (default 1, the calling thread).
        progress: report decoding progress on stderr.

    Returns an ``ImageDataset``: labels int64 (N,) in [0, C) or uint8 (N, C) multi-hot.
    """
    list_file = read_list_file(list_path)
    size = normalize_size(image_size)
    if size is None:
        raise ValueError("image_size is required for list files (images differ in size)")
    store = ImageStore(os.fspath(root))
    names = resolve_image_names(list_file, store, strip_prefix)
    if check_files:
        missing = [
            (n, line)
            for n, line in zip(names, list_file.line_numbers, strict=True)
            if not store.exists(n)
        ]
        if missing:
            examples = ", ".join(f"{store.describe(n)} (line {line})" for n, line in missing[:3])
            raise FileNotFoundError(
                f"{len(missing)} of {len(names)} images listed in {list_file.path} are missing "
                f"under {store.path}, e.g. {examples}; check root and strip_prefix, or pass "
                "check_files=False to find out only when an image is read"
            )
    labels, classes = _labels_and_classes(list_file, class_indices, class_names)
    if in_memory:
        decoded = decode_many(
            store,
            names,
            size,
            skip_corrupt=skip_corrupt,
            workers=workers,
            desc=f"decoding {Path(list_file.path).name}",
            progress=progress,
        )
        return ImageDataset(decoded.images, labels[decoded.kept], classes, list_file.path)
    return ImageDataset(ImageFileReader(store, names, size), labels, classes, list_file.path)


def _labels_and_classes(
    list_file: ListFile,
    class_indices: Sequence[int] | np.ndarray | None,
    class_names: Sequence[str] | None,
) -> tuple[np.ndarray, list[str]]:
    if list_file.is_multilabel:
        labels = list_file.labels
        width = labels.shape[1]
        classes = [str(j) for j in range(width)] if class_names is None else list(class_names)
        if len(classes) != width:
            raise ValueError(
                f"{len(classes)} class names given but {list_file.path} has {width} label columns"
            )
        return labels, classes
    indices = (
        list_file.class_indices
        if class_indices is None
        else np.asarray(class_indices, dtype=np.int64)
    )
    if len(np.unique(indices)) != len(indices):
        raise ValueError("class_indices must not repeat an index")
    order = np.argsort(indices, kind="stable")
    positions = np.searchsorted(indices[order], list_file.labels)
    positions = np.clip(positions, 0, len(indices) - 1)
    found = indices[order][positions] == list_file.labels
    if not found.all():
        row = int(np.flatnonzero(~found)[0])
        raise ValueError(
            f"line {list_file.line_numbers[row]} of {list_file.path} has class index "
            f"{list_file.labels[row]}, which is not among the {len(indices)} class_indices "
            "given; pass the class indices of every list of the benchmark"
        )
    labels = order[positions].astype(np.int64)
    classes = [str(i) for i in indices] if class_names is None else list(class_names)
    if len(classes) != len(indices):
        raise ValueError(f"{len(classes)} class names given for {len(indices)} classes")
    return labels, classes
