"""A multi-label collection made from a single-label one: mosaics of several images.

NUS-WIDE's images cannot be had offline, but its path (multi-hot labels, sigmoid L_C,
multi-label L_S, "shares at least one label" relevance, list files with C binary labels) can
be exercised for real on images that carry several labels for a reason: a ``grid x grid``
mosaic of single-label images is labelled with every class it shows.

:func:`make_mosaics` draws the tiles without replacement (each source image is in at most one
mosaic, so no image is shared between a query and a database item); :func:`write_list_file`
saves the mosaics as PNG files beside a DVSQ/DPQ list file in the NUS-WIDE format
(``<path> <C binary labels>``), which ``dpq train``, ``dpq data split`` and ``dpq evaluate``
read like any other list file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def make_mosaics(
    images: np.ndarray, labels: np.ndarray, num_classes: int, grid: int = 2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Tile ``grid x grid`` images into one, as many mosaics as the images allow.

    Args:
        images: uint8 (N, H, W, 3) single-label images.
        labels: int (N,) class ids in 0..num_classes-1.
        num_classes: C.
        grid: tiles per side (2: four images per mosaic).
        seed: seed of the draw (``np.random.default_rng``).

    Returns:
        mosaics uint8 (N // grid**2, grid H, grid W, 3) and multi-hot labels uint8 (M, C): 1
        for every class among the mosaic's tiles. Tiles are drawn without replacement.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[3] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3); got {images.dtype} {images.shape}.")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be int ({len(images)},) class ids; got {labels.shape}.")
    if grid < 1:
        raise ValueError(f"grid must be at least 1; got {grid}.")
    tiles = grid * grid
    count = len(images) // tiles
    if count == 0:
        raise ValueError(f"{len(images)} images are too few for a {grid}x{grid} mosaic.")
    order = np.random.default_rng(seed).permutation(len(images))[: count * tiles]
    order = order.reshape(count, grid, grid)
    _, height, width, _ = images.shape
    mosaics = images[order]  # (M, grid, grid, H, W, 3)
    mosaics = mosaics.transpose(0, 1, 3, 2, 4, 5).reshape(count, grid * height, grid * width, 3)
    multi_hot = np.zeros((count, num_classes), np.uint8)
    np.put_along_axis(multi_hot, labels[order.reshape(count, tiles)], 1, axis=1)
    return np.ascontiguousarray(mosaics), multi_hot


def write_list_file(
    folder: str | os.PathLike[str], images: np.ndarray, labels: np.ndarray, name: str = "list.txt"
) -> Path:
    """Save images as ``folder/images/NNNNNN.png`` and a NUS-WIDE-format list file
    ``folder/name`` (``images/NNNNNN.png 0 1 0 ...``, one line per image; paths relative to
    ``folder``, the ``--image-root``). Returns the list file's path."""
    from PIL import Image

    from dpq.atomic import write_text_atomic

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, row) in enumerate(zip(images, labels, strict=True)):
        relative = f"images/{i:06d}.png"
        Image.fromarray(image).save(folder / relative)
        lines.append(relative + " " + " ".join(str(int(v)) for v in row))
    return write_text_atomic(folder / name, "\n".join(lines) + "\n")
