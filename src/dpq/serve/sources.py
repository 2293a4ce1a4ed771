"""The images an index was encoded from, as the service shows them: :class:`ImageSource`
(thumbnails, full-size images, file names by item id), read with :func:`load_image_source`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dpq.serve.images import png_bytes

if TYPE_CHECKING:
    from dpq.index import DPQIndex
    from dpq.serve.settings import ServeSettings

__all__ = ["ImageSource", "image_source_for", "load_image_source"]


@dataclass(frozen=True)
class ImageSource:
    """The images an index was encoded from: ``images`` uint8 (N, H, W, 3) (an array, or an
    on-demand reader with the same indexing) whose row numbers are the item ids (as ``dpq
    encode --images`` assigns them), ``labels``, ``classes``."""

    name: str
    images: Any
    labels: np.ndarray | None
    classes: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def file_name(self, row: int) -> str | None:
        """The image file of a row relative to the collection (its folder, zip or list
        file's root), '/'-separated; None when the source has no files (digits, arrays)."""
        names = getattr(self.images, "names", None)
        return None if names is None else str(names[row])

    def full_png(self, row: int, max_pixels: int) -> bytes:
        """PNG bytes of a row's image at its own size: the file decoded anew (the decoder of
        every dpq image: :func:`dpq.data.decode.open_image`), or the array row of an
        in-memory source."""
        name = self.file_name(row)
        if name is None:
            return png_bytes(np.asarray(self.images[row], np.uint8))
        from dpq.data.decode import open_image

        store = self.images.store
        return png_bytes(open_image(store.read(name), store.describe(name), max_pixels))


def load_image_source(
    source: str,
    image_root: str | None = None,
    image_size: int | None = None,
    strip_prefix: str | None = None,
    skip_corrupt: bool = False,
) -> ImageSource:
    """A labelled image source for thumbnails and labels (:func:`dpq.data.load_source`: any
    source ``dpq encode`` reads; list files are read on demand). The one place the service
    reads sources."""
    from dpq.data import load_source

    loaded = load_source(
        source,
        image_root=image_root,
        image_size=image_size,
        strip_prefix=strip_prefix,
        skip_corrupt=skip_corrupt,
        in_memory=False,
        progress=False,
    )
    if loaded.kind == "features":
        raise ValueError(f"{source} holds features, not images; --images needs an image source.")
    return ImageSource(str(source), loaded.inputs, loaded.labels, list(loaded.classes))


def image_source_for(
    settings: ServeSettings, index: DPQIndex, added: dict[int, Any]
) -> ImageSource | None:
    """The image source of ``settings.images`` (None without one), checked to hold a row
    for every id of the index that was not added through the service."""
    if settings.images is None:
        return None
    source = load_image_source(
        settings.images, image_root=settings.image_root, image_size=settings.image_size
    )
    from_source = np.setdiff1d(index.ids, np.fromiter(added, np.int64, len(added)))
    if from_source.size and from_source.max() >= len(source.images):
        raise ValueError(
            f"the index has item ids up to {int(from_source.max())} but {settings.images} has "
            f"{len(source.images)} images; ids are row numbers of the source the index was "
            "encoded from: pass that source."
        )
    return source
