"""A user's own collection: a folder or zip of ``<class>/<image>`` files."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from dpq.data.dataset import ImageDataset, ImageFileReader
from dpq.data.decode import ImageStore, decode_many, is_image_name, normalize_size


def class_folders(store: ImageStore) -> tuple[str, list[str], dict[str, list[str]]]:
    """Find the class folders of a ``<class>/<image>`` store.

    Returns (prefix, class names sorted, {class: image names sorted}). Images may sit in
    sub-folders of a class folder. A single top-level folder that holds no images itself
    but has sub-folders is taken as a wrapper (``photos/<class>/<image>``) and skipped.
    Files that are not Pillow-readable images (by extension) are ignored.
    """
    files, folders = store.entries()
    prefix = ""
    tops = [f for f in folders if "/" not in f]
    if len(tops) == 1 and not any("/" not in f for f in files):
        top = tops[0]
        holds_images = any(f.startswith(top + "/") and "/" not in f[len(top) + 1 :] for f in files)
        has_subfolders = any(f.startswith(top + "/") for f in folders)
        if not holds_images and has_subfolders:
            prefix = top + "/"
    classes = sorted(
        f[len(prefix) :] for f in folders if f.startswith(prefix) and "/" not in f[len(prefix) :]
    )
    if not classes:
        raise ValueError(
            f"{store.path} has no class folders; expected a folder or zip laid out as "
            "<class>/<image>, one sub-folder per class"
        )
    members: dict[str, list[str]] = {name: [] for name in classes}
    for file in files:
        if not file.startswith(prefix) or not is_image_name(file):
            continue
        rest = file[len(prefix) :]
        if "/" in rest:
            members[rest.split("/", 1)[0]].append(file)
    for name in classes:
        if not members[name]:
            raise ValueError(
                f"class folder {store.describe(prefix + name)} has no images; add images to it "
                "or remove the folder (every class needs at least one Pillow-readable image)"
            )
    return prefix, classes, members


def load_image_folder(
    path: str | os.PathLike[str],
    image_size: int | Sequence[int] | None = None,
    skip_corrupt: bool = False,
    workers: int | None = None,
    in_memory: bool = True,
) -> ImageDataset:
    """Load a folder or zip of ``<class>/<image>`` into an in-memory ``ImageDataset``
    (``in_memory=False``: an ``ImageFileReader`` that decodes each image when it is read).

    Args:
        path: a folder, or a zip file with the same layout.
        image_size: an int ``s`` or ``(height, width)``; every image is resized to it.
            Required when the images differ in size.
        skip_corrupt: skip undecodable images with a ``SkippedImagesWarning`` instead of
            raising ``CorruptImageError`` (a ``ValueError`` naming the file).
        workers: decoding processes for large collections (default up to 2).

    Returns images uint8 (N, H, W, 3) converted to RGB, labels int64 (N,) indexing
    ``classes`` (the class folder names, sorted); images ordered by class, then by name.
    """
    store = ImageStore(os.fspath(path))
    _prefix, classes, members = class_folders(store)
    names: list[str] = []
    labels: list[int] = []
    for class_index, name in enumerate(classes):
        names.extend(sorted(members[name]))
        labels.extend([class_index] * len(members[name]))
    if not in_memory:
        size = normalize_size(image_size)
        if size is None:
            raise ValueError(
                f"reading {store.path} on demand needs an image size (CLI: --image-size), "
                "the side every image is resized to"
            )
        reader = ImageFileReader(store, names, size)
        return ImageDataset(reader, np.asarray(labels, dtype=np.int64), classes, store.path)
    decoded = decode_many(
        store,
        names,
        normalize_size(image_size),
        skip_corrupt=skip_corrupt,
        workers=workers,
        desc=f"decoding {os.path.basename(store.path)}",
    )
    label_array = np.asarray(labels, dtype=np.int64)[decoded.kept]
    return ImageDataset(decoded.images, label_array, classes, store.path)
