"""dpq.data.decode's one image decoder (open_image / rgb_image), used by the data layer and
by the service's uploads: EXIF orientation, transparency on white, 16-bit images scaled
(not clipped), bombs and non-images refused. Images are built in the test."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dpq.data.decode import (
    CorruptImageError,
    TooManyPixelsError,
    UnknownImageFormatError,
    decode_image,
    open_image,
)


def _encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_exif_orientation_is_applied():
    """A 4 x 2 JPEG whose EXIF says "rotate 90 degrees clockwise to view" (orientation 6)
    decodes as the 2 x 4 picture a viewer shows, its red left half on top."""
    pixels = np.zeros((2, 4, 3), np.uint8)
    pixels[:, :2] = (255, 0, 0)  # left half red, right half black
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encoded(Image.fromarray(pixels), "JPEG", exif=exif, quality=100)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.size == (4, 2)  # stored landscape
    shown = np.asarray(open_image(data, "phone.jpg"))
    assert shown.shape == (4, 2, 3)
    assert shown[0, :, 0].min() > 200 and shown[-1, :, 0].max() < 60  # red on top


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(mode):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # fully transparent black: white when shown
    rgba[0, 1] = (0, 0, 0, 255)  # opaque black
    rgba[1, :] = (0, 0, 0, 128)  # half transparent black: mid grey
    image = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":
        image = image.convert("P")
        image.info["transparency"] = image.getpixel((0, 0))
    decoded = np.asarray(open_image(_encoded(image), f"{mode}.png")).astype(int)
    assert decoded[0, 0].tolist() == [255, 255, 255]  # was black: alpha dropped onto black
    assert decoded[0, 1].tolist() == [0, 0, 0]
    if mode != "P":  # a palette has one transparent entry, not partial alpha
        assert 120 <= decoded[1, 0, 0] <= 135


def test_sixteen_bit_images_are_scaled_not_clipped():
    ramp = np.array([[0, 257, 32896, 65535]], np.uint16)  # 0, 1, 128, 255 in 8 bits
    image = Image.fromarray(ramp)
    assert image.mode.startswith("I;16")
    decoded = np.asarray(open_image(_encoded(image), "depth.png"))
    assert decoded[0, :, 0].tolist() == [0, 1, 128, 255]  # was [0, 255, 255, 255]
    assert (decoded[..., 0] == decoded[..., 2]).all()  # grey stays grey
    wide = Image.fromarray(ramp.astype(np.int32), "I")  # how some readers open 16-bit PNGs
    assert np.asarray(open_image(_encoded(wide, "TIFF"), "wide.tif"))[0, :, 0].tolist() == [
        0, 1, 128, 255
    ]  # fmt: skip
    small = Image.fromarray(np.array([[0, 7, 255]], np.int32), "I")  # 8-bit values in "I"
    assert np.asarray(open_image(_encoded(small, "TIFF"), "small.tif"))[0, :, 0].tolist() == [
        0, 7, 255
    ]  # fmt: skip
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert np.asarray(open_image(_encoded(unit, "TIFF"), "unit.tif"))[0, :, 0].tolist() == [
        0, 128, 255
    ]  # fmt: skip


def test_the_data_layer_decodes_the_same_way():
    ramp = Image.fromarray(np.array([[0, 65535], [32896, 257]], np.uint16))
    resized = decode_image(_encoded(ramp), "ramp.png", (2, 2))
    assert resized.dtype == np.uint8 and resized[:, :, 0].tolist() == [[0, 255], [128, 1]]


def test_refusals_name_the_file_and_the_kind():
    with pytest.raises(UnknownImageFormatError, match="notes.txt"):
        open_image(b"hello", "notes.txt")
    with pytest.raises(UnknownImageFormatError, match="empty"):
        open_image(b"", "empty.png")
    with pytest.raises(TooManyPixelsError, match="declares 100 x 100 pixels, more than the limit"):
        open_image(_encoded(Image.new("RGB", (100, 100))), "big.png", max_pixels=9_999)
    with pytest.raises(CorruptImageError, match="cut.png") as cut:
        open_image(_encoded(Image.new("RGB", (60, 60), (9, 9, 9)))[:80], "cut.png")
    assert type(cut.value) is CorruptImageError
