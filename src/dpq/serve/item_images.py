"""Where the service finds an item's images (:class:`ItemImages`): the thumbnails of items
added over HTTP, in a folder beside the index, and the images of the source the index was
encoded from, by row (thumbnails cached, full size decoded anew)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from dpq.atomic import write_bytes_atomic
from dpq.serve.images import thumbnail_png
from dpq.serve.journal import WriteFailedError
from dpq.serve.sources import ImageSource

__all__ = ["ItemImages"]


class ItemImages:
    """The images of a served collection.

    Args:
        folder: where thumbnails of items added over HTTP are kept (``<index>.items``).
        source: the images the index was encoded from (ids are their rows), or None.
        thumbnail_size: longer side of thumbnails in pixels.
        max_pixels: the largest full-size source image decoded.
    """

    def __init__(
        self, folder: Path, source: ImageSource | None, thumbnail_size: int, max_pixels: int
    ) -> None:
        self.folder = Path(folder)
        self.source = source
        self.thumbnail_size = int(thumbnail_size)
        self.max_pixels = int(max_pixels)
        self._source_thumbnail = lru_cache(maxsize=4096)(self._make_source_thumbnail)

    def in_source(self, item_id: int) -> bool:
        """Whether the source has a row for this id."""
        return self.source is not None and 0 <= item_id < len(self.source)

    def _path(self, item_id: int) -> Path:
        return self.folder / f"{item_id}.png"

    def _make_source_thumbnail(self, item_id: int) -> bytes:
        assert self.source is not None
        return thumbnail_png(self.source.images[item_id], self.thumbnail_size)

    def thumbnails_of(self, images: Sequence[Any] | None, n: int) -> list[bytes | None]:
        """PNG thumbnails of n new items' images (Pillow images, uint8 arrays, or None)."""
        return [
            None if image is None else thumbnail_png(image, self.thumbnail_size)
            for image in images or [None] * n
        ]

    def store(self, ids: Sequence[int], thumbnails: Sequence[bytes | None]) -> None:
        """Keep the thumbnails of items added over HTTP (atomically, one file each).
        Raises WriteFailedError when the disk refuses one."""
        for item_id, thumbnail in zip(ids, thumbnails, strict=True):
            if thumbnail is None:
                continue
            try:
                write_bytes_atomic(self._path(int(item_id)), thumbnail)
            except OSError as exc:
                raise WriteFailedError(
                    f"the image of a new item could not be stored ({exc.strerror or exc}), "
                    "so nothing was added; retry once the disk has space again."
                ) from None

    def forget(self, item_id: int) -> None:
        """Delete the stored thumbnail of a removed item (if any)."""
        self._path(item_id).unlink(missing_ok=True)

    def stored_thumbnail(self, item_id: int) -> bytes | None:
        """The thumbnail kept for an item added over HTTP (None if there is none)."""
        try:
            return self._path(item_id).read_bytes()
        except FileNotFoundError:
            return None

    def source_thumbnail(self, item_id: int) -> bytes:
        """PNG thumbnail of the source's row ``item_id`` (cached)."""
        return self._source_thumbnail(item_id)

    def source_full(self, item_id: int) -> bytes:
        """PNG of the source's row ``item_id`` at its own size."""
        assert self.source is not None
        return self.source.full_png(item_id, self.max_pixels)

    def source_facts(self, item_id: int) -> dict[str, Any]:
        """Metadata of a source row: the source's name, the row, and its file (relative to
        the collection) when the source has files."""
        assert self.source is not None
        facts: dict[str, Any] = {"source": Path(self.source.name).name, "row": item_id}
        file_name = self.source.file_name(item_id)
        if file_name is not None:
            facts["file"] = file_name
        return facts
