"""Turning image files (in a folder or a zip) into uint8 (N, H, W, 3) arrays.

Decoding uses Pillow (:func:`open_image`, also the service's decoder of uploads); every
image is converted to 8-bit RGB as :func:`rgb_image` says (EXIF orientation applied, alpha
on white, 16 bits scaled) and, when a size is given, resized
with bilinear filtering, in order, on the calling thread. It works from any script, a
notebook or ``python -`` alike (a "spawn" process pool re-ran the caller's script and broke
plain scripts). ``workers=N`` decodes on N threads instead; measured on this project's
2-core machine (``benchmarks/decode_speed.py``), threads did not pay (0.7x one thread on
CIFAR-10's 32x32 JPEGs, 0.9x on 640x480 photos resized to 224: the per-image Python work
holds the GIL), while a spawn pool reached 1.7x where it worked at all. Collections too large
for memory are read by the streaming data loader's worker processes instead.
"""

from __future__ import annotations

import io
import os
import re
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dpq.progress import progress_bar

# Below this many images, decoding stays on the calling thread.
THREAD_THRESHOLD = 2000
CHUNK_SIZE = 1000
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>")


class CorruptImageError(ValueError):
    """An image file that Pillow cannot decode (corrupt, truncated or not an image)."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason
        super().__init__(
            f"cannot decode image {name}: {reason}. Replace or delete the file, or skip "
            "unreadable images with a warning: --skip-corrupt (Python: skip_corrupt=True)"
        )

    def __reduce__(self) -> tuple:
        return (type(self), (self.name, self.reason))


class SkippedImagesWarning(UserWarning):
    """Some images were skipped because they could not be decoded (``skip_corrupt=True``).

    ``count`` is how many; the message names the first one and why it failed."""

    def __init__(self, count: int, total: int, first: tuple[str, str]) -> None:
        self.count, self.total, self.first = int(count), int(total), first
        super().__init__(
            f"skipped {count} of {total} images that could not be decoded "
            f"(first: {first[0]}: {first[1]})"
        )

    def __reduce__(self) -> tuple:
        return (SkippedImagesWarning, (self.count, self.total, self.first))


@cache
def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with the dot) of every format Pillow can open."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def is_image_name(name: str) -> bool:
    """True for a file name whose extension is a Pillow-readable format (not hidden files)."""
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in image_extensions()


def normalize_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``None``, an int ``s`` (-> (s, s)) or ``(height, width)`` -> ``(height, width)``."""
    if image_size is None:
        return None
    if isinstance(image_size, int | np.integer):
        size = (int(image_size), int(image_size))
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(
            f"image_size must be a positive int or (height, width), got {image_size!r}"
        )
    return size  # type: ignore[return-value]


# Open zip files of this process, by (path, size, mtime): a replaced file is opened anew.
_open_zips: dict[tuple[str, int, int], zipfile.ZipFile] = {}
# A forked child (a DataLoader worker) opens its own handles: an inherited one shares its
# file offset with the parent, and concurrent seek + read would mix up their bytes.
os.register_at_fork(after_in_child=_open_zips.clear)


@dataclass(frozen=True)
class ImageStore:
    """A folder or a zip file whose files are addressed by '/'-separated relative names."""

    path: str
    is_zip: bool = field(init=False)
    _stamp: tuple[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        path = os.fspath(self.path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist; pass an existing folder or zip file")
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "is_zip", not os.path.isdir(path))
        stat = os.stat(path)
        object.__setattr__(self, "_stamp", (stat.st_size, stat.st_mtime_ns))

    def _zip(self) -> zipfile.ZipFile:
        handle = _open_zips.get((self.path, *self._stamp))
        if handle is None:
            try:
                handle = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise ValueError(
                    f"{self.path} is neither a folder nor a readable zip file ({exc}); pass a "
                    "folder of images or a zip of one"
                ) from exc
            _open_zips[(self.path, *self._stamp)] = handle
        return handle

    def entries(self) -> tuple[list[str], list[str]]:
        """(file names, folder names), both relative, '/'-separated, sorted."""
        if self.is_zip:
            files, folders = set(), set()
            for info in self._zip().infolist():
                name = info.filename.strip("/")
                if not name or name.startswith("__MACOSX"):
                    continue
                if info.is_dir():
                    folders.add(name)
                else:
                    files.add(name)
                parts = name.split("/")
                folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
            return sorted(files), sorted(folders)
        files, folders = [], []
        root = Path(self.path)
        # class folders may be symbolic links (a collection assembled from elsewhere); a link
        # to a folder that holds one already on the way down is skipped, so no loop recurses
        chains = {str(root): (os.path.realpath(root),)}
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            chain = chains.pop(dirpath)
            kept = []
            for d in dirnames:
                real = os.path.realpath(os.path.join(dirpath, d))
                if d.startswith(".") or any(_contains(real, seen) for seen in chain):
                    continue
                kept.append(d)
                chains[os.path.join(dirpath, d)] = (*chain, real)
            dirnames[:] = kept
            rel = Path(dirpath).relative_to(root).as_posix()
            prefix = "" if rel == "." else rel + "/"
            folders.extend(prefix + d for d in dirnames)
            files.extend(prefix + f for f in filenames)
        return sorted(files), sorted(folders)

    def exists(self, name: str) -> bool:
        if self.is_zip:
            try:
                self._zip().getinfo(name)
            except KeyError:
                return False
            return True
        return os.path.isfile(os.path.join(self.path, name))

    def read(self, name: str) -> bytes:
        if self.is_zip:
            try:
                return self._zip().read(name)
            except KeyError:
                raise FileNotFoundError(f"{self.describe(name)} is not in the zip file") from None
        with open(os.path.join(self.path, name), "rb") as handle:
            return handle.read()

    def describe(self, name: str) -> str:
        """A name for messages: 'path/in/folder' or 'archive.zip:member'."""
        if self.is_zip:
            return f"'{self.path}:{name}'"
        return f"'{os.path.join(self.path, name)}'"


def _contains(outer: str, inner: str) -> bool:
    """True when the folder ``outer`` is ``inner`` or one of its ancestors (real paths)."""
    return os.path.commonpath([outer, inner]) == outer


class UnknownImageFormatError(CorruptImageError):
    """Bytes that are no image format Pillow knows (e.g. a text file named .jpg)."""


class TooManyPixelsError(CorruptImageError):
    """An image whose header declares more pixels than allowed (a decompression bomb)."""


# Pillow modes of 16-bit (and 32-bit integer) single-channel images.
_WIDE_INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _reason(exc: BaseException) -> str:
    # Pillow names the in-memory buffer ("<_io.BytesIO object at 0x...>"): say "the file"
    return _OBJECT_REPR.sub("the file", str(exc)) or type(exc).__name__


def _eight_bit_gray(image: Image.Image) -> Image.Image:
    """An 8-bit "L" image of a 16-bit, 32-bit integer or float single-channel image, scaled
    (not clipped): 16-bit values by 255/65535, floats in [0, 1] by 255, wider ranges by their
    maximum."""
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if image.mode == "F":
        scale = 255.0 if top <= 1.0 else 255.0 / max(top, 255.0)
    elif image.mode.startswith("I;16") or top <= 65535:
        scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or top > 255 else 1.0
    else:
        scale = 255.0 / top
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")


def rgb_image(image: Image.Image) -> Image.Image:
    """A loaded Pillow image as dpq sees every image: EXIF orientation applied
    (``ImageOps.exif_transpose``), transparency composited onto white, 16-bit, 32-bit and
    float channels scaled to 8 bits (not clipped), then 8-bit RGB."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in _WIDE_INTEGER_MODES or image.mode == "F":
        image = _eight_bit_gray(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def open_image(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """Decode one image file's bytes to an 8-bit RGB Pillow image at its own size
    (:func:`rgb_image`): the one decoder of every image dpq reads, from a collection or an
    upload.

    ``max_pixels``: refuse an image whose header declares more pixels, before any pixel is
    decoded (decompression bombs: a few kB of PNG can declare gigapixels). Raises
    :class:`UnknownImageFormatError` (not an image), :class:`TooManyPixelsError`, or
    :class:`CorruptImageError` (damaged, truncated), each naming ``name``.
    """
    if not data:
        raise UnknownImageFormatError(name, "the file is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnknownImageFormatError(name, "it is no image format Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise TooManyPixelsError(name, _reason(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImageError(name, _reason(exc)) from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise TooManyPixelsError(
            name,
            f"it declares {width} x {height} pixels, more than the limit of {max_pixels:,}",
        )
    try:
        image.load()
        return rgb_image(image)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(name, _reason(exc)) from None


def decode_image(data: bytes, name: str, image_size: tuple[int, int] | None) -> np.ndarray:
    """Decode one image file's bytes (:func:`open_image`) to uint8 (H, W, 3) RGB, resized to
    (height, width) with bilinear filtering.

    Raises ``CorruptImageError`` naming ``name`` when Pillow cannot decode it (including
    truncated files).
    """
    rgb = open_image(data, name)
    if image_size is not None and rgb.size != (image_size[1], image_size[0]):
        rgb = rgb.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _decode_chunk(
    store: ImageStore, names: Sequence[str], image_size: tuple[int, int] | None
) -> tuple[list[np.ndarray | None], list[tuple[int, str]]]:
    """Decode ``names``; returns per-name arrays (None where it failed) and the failures."""
    arrays: list[np.ndarray | None] = []
    failures: list[tuple[int, str]] = []
    for position, name in enumerate(names):
        try:
            data = store.read(name)
            arrays.append(decode_image(data, store.describe(name), image_size))
        except CorruptImageError as exc:
            arrays.append(None)
            failures.append((position, exc.reason))
        except (OSError, zipfile.BadZipFile) as exc:
            arrays.append(None)
            failures.append((position, f"cannot read the file ({exc})"))
    return arrays, failures


@dataclass(frozen=True)
class DecodedImages:
    """Result of ``decode_many``.

    Attributes:
        images: uint8 (n, H, W, 3), the decoded images in input order (skipped ones left out).
        kept: int64 (n,), positions in the input list of the decoded images.
        skipped: (name, reason) of every image that could not be decoded.
    """

    images: np.ndarray
    kept: np.ndarray
    skipped: list[tuple[str, str]]


def decode_many(
    store: ImageStore,
    names: Sequence[str],
    image_size: tuple[int, int] | None = None,
    *,
    skip_corrupt: bool = False,
    workers: int | None = None,
    desc: str = "decoding images",
    progress: bool = True,
) -> DecodedImages:
    """Decode ``names`` from ``store`` into one uint8 (n, H, W, 3) array, in order.

    Without ``image_size`` every image must already have the same size. A file that cannot
    be decoded raises ``CorruptImageError`` naming it, unless ``skip_corrupt`` is set: then
    it is left out, listed in ``skipped`` and counted in a ``SkippedImagesWarning``.
    ``workers`` threads decode in parallel once there are more than ``THREAD_THRESHOLD``
    images (default 1: on the calling thread; see the module doc). ``progress`` reports on
    stderr.
    """
    if not names:
        raise ValueError(f"no images to decode in {store.path}")
    workers = 1 if workers is None else max(1, int(workers))
    chunks = [names[i : i + CHUNK_SIZE] for i in range(0, len(names), CHUNK_SIZE)]
    out: np.ndarray | None = None
    first_name = ""
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    bar = progress_bar(len(names), desc, "img", enabled=progress, leave=False)
    try:
        for chunk_index, (arrays, failures) in enumerate(
            _map_chunks(store, chunks, image_size, workers, len(names))
        ):
            offset = chunk_index * CHUNK_SIZE
            for position, reason in failures:
                name = store.describe(chunks[chunk_index][position])
                if not skip_corrupt:
                    raise CorruptImageError(name, reason)
                skipped.append((name, reason))
            for position, array in enumerate(arrays):
                if array is None:
                    continue
                if out is None:
                    out = np.empty((len(names), *array.shape), dtype=np.uint8)
                    first_name = store.describe(chunks[chunk_index][position])
                elif array.shape != out.shape[1:]:
                    name = store.describe(chunks[chunk_index][position])
                    raise ValueError(
                        f"images differ in size: {first_name} is {out.shape[2]}x{out.shape[1]} "
                        f"but {name} is {array.shape[1]}x{array.shape[0]} (width x height); "
                        "pass image_size (CLI: --image-size) to resize every image to one size"
                    )
                out[len(kept)] = array
                kept.append(offset + position)
            bar.update(len(arrays))
    finally:
        bar.close()
    if out is None:
        raise ValueError(
            f"none of the {len(names)} images in {store.path} could be decoded "
            f"(first: {skipped[0][0]}: {skipped[0][1]})"
        )
    if skipped:
        warnings.warn(SkippedImagesWarning(len(skipped), len(names), skipped[0]), stacklevel=2)
    return DecodedImages(out[: len(kept)], np.asarray(kept, dtype=np.int64), skipped)


def _map_chunks(
    store: ImageStore,
    chunks: list[Sequence[str]],
    image_size: tuple[int, int] | None,
    workers: int,
    total: int,
) -> Iterator[tuple[list[np.ndarray | None], list[tuple[int, str]]]]:
    """Decoded chunks in order: on this thread for small jobs, else on ``workers`` threads."""
    if workers <= 1 or total <= THREAD_THRESHOLD:
        for chunk in chunks:
            yield _decode_chunk(store, chunk, image_size)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dpq-decode") as pool:
        yield from pool.map(lambda chunk: _decode_chunk(store, chunk, image_size), chunks)
