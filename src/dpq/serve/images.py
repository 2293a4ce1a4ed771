"""Uploaded images: decoding with limits, resizing for the model, thumbnails (Pillow)."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image

from dpq.data.decode import (
    CorruptImageError,
    TooManyPixelsError,
    UnknownImageFormatError,
    open_image,
)

__all__ = [
    "BadImageError",
    "NotAnImageError",
    "decode_base64",
    "decode_upload",
    "model_input",
    "png_bytes",
    "thumbnail_png",
]

# Uploads with more pixels than this are refused before they are decoded (decompression
# bombs: a few kB of PNG can declare gigapixels). 40 MP is more than any phone camera.
DEFAULT_MAX_PIXELS = 40_000_000


class NotAnImageError(ValueError):
    """The upload is no image format Pillow knows (the service answers 415)."""


class BadImageError(ValueError):
    """An image that is damaged, truncated or too large once decoded (the service answers 422)."""


def decode_base64(data: str, what: str) -> bytes:
    """The file bytes of base64 text (a ``data:...;base64,`` URL too); ValueError naming
    ``what`` when it is not base64."""
    try:
        return base64.b64decode(
            data.split(",", 1)[1] if data.startswith("data:") else data, validate=True
        )
    except (binascii.Error, ValueError):
        raise ValueError(
            f"{what} is not valid base64; send the file's bytes base64-encoded."
        ) from None


def decode_upload(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode uploaded bytes to an RGB Pillow image at its own size, with the decoder of
    every image dpq reads (:func:`dpq.data.decode.open_image`: EXIF orientation, alpha on
    white, 16 bits scaled).

    The pixel count is read from the header and checked against ``max_pixels`` before any
    pixel is decoded. Raises NotAnImageError (unknown format) or BadImageError (damaged,
    truncated, or more than ``max_pixels`` pixels), each naming ``name``.
    """
    if not data:
        raise NotAnImageError(f"{name} is empty; upload an image file (JPEG, PNG, WebP, ...).")
    try:
        return open_image(data, name, max_pixels)
    except UnknownImageFormatError:
        raise NotAnImageError(
            f"{name} is not an image Pillow can read; upload a JPEG, PNG, WebP, GIF or BMP file."
        ) from None
    except TooManyPixelsError as exc:
        raise BadImageError(
            f"{name} is refused as a decompression bomb ({exc.reason}); resize it first."
        ) from None
    except CorruptImageError as exc:
        raise BadImageError(f"{name} is damaged or truncated: {exc.reason}") from None


def model_input(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """uint8 (height, width, 3) of an RGB image resized (bilinear, as the data loaders do)."""
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)  # a writable copy (torch refuses read-only arrays)


def thumbnail_png(image: Image.Image | np.ndarray, size: int) -> bytes:
    """PNG bytes of an image scaled so its longer side is ``size`` pixels.

    Small images (e.g. 32 x 32) are enlarged by nearest-neighbour when the factor is 2 or
    more, so they stay sharp; others are resampled with Lanczos.
    """
    picture = (
        Image.fromarray(np.asarray(image, np.uint8)) if isinstance(image, np.ndarray) else image
    )
    if picture.mode != "RGB":
        picture = picture.convert("RGB")
    width, height = picture.size
    scale = size / max(width, height)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    if target != picture.size:
        method = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
        picture = picture.resize(target, method)
    return png_bytes(picture)


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """PNG bytes of an RGB image (a Pillow image or uint8 (H, W, 3)) at its own size."""
    picture = (
        Image.fromarray(np.asarray(image, np.uint8)) if isinstance(image, np.ndarray) else image
    )
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
