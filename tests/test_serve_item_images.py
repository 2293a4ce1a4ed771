"""dpq.serve.item_images and dpq.serve.sources alone: thumbnails kept for added items (and a
disk that refuses them), a source's rows as thumbnails, full-size images and file names."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")

from conftest import make_image_folder  # noqa: E402
from dpq.serve.item_images import ItemImages  # noqa: E402
from dpq.serve.journal import WriteFailedError  # noqa: E402
from dpq.serve.sources import ImageSource, load_image_source  # noqa: E402


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def test_added_items_keep_a_thumbnail_until_forgotten(tmp_path):
    images = ItemImages(tmp_path / "x.index.npz.items", None, thumbnail_size=16, max_pixels=100)
    picture = np.full((4, 8, 3), 200, np.uint8)
    thumbs = images.thumbnails_of([picture, None], 2)
    assert thumbs[1] is None and _pixels(thumbs[0]).shape == (8, 16, 3)
    images.store([5, 6], thumbs)
    assert images.stored_thumbnail(5) == thumbs[0] and images.stored_thumbnail(6) is None
    images.forget(5)
    assert images.stored_thumbnail(5) is None and not images.in_source(0)


def test_a_refused_thumbnail_is_a_write_failure(tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    images = ItemImages(tmp_path / "a-file" / "items", None, 16, 100)  # cannot be made
    with pytest.raises(WriteFailedError, match="could not be stored"):
        images.store([1], images.thumbnails_of([np.zeros((2, 2, 3), np.uint8)], 1))


def test_a_folder_source_names_files_and_gives_full_size_images(tmp_path):
    made = make_image_folder(tmp_path / "photos", {"cats": 2, "dogs": 1}, size=12)
    source = load_image_source(str(tmp_path / "photos"), image_size=4)
    images = ItemImages(tmp_path / "items", source, thumbnail_size=24, max_pixels=10_000)
    assert len(source) == 3 and source.file_name(2) == "dogs/000.png"
    assert images.in_source(2) and not images.in_source(3)
    assert np.array_equal(_pixels(images.source_full(1)), made["cats"][1])  # 12 x 12, not 4
    assert _pixels(images.source_thumbnail(1)).shape == (24, 24, 3)
    assert images.source_facts(2) == {"source": "photos", "row": 2, "file": "dogs/000.png"}


def test_an_in_memory_source_has_no_file_names():
    rows = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    source = ImageSource("digits", rows, None, [])
    assert source.file_name(0) is None
    assert np.array_equal(_pixels(source.full_png(1, 100)), rows[1])
