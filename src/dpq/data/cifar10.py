"""CIFAR-10: all 60,000 images (train then test), from any of its usual forms.

Accepted sources:
- the official ``cifar-10-python.tar.gz`` (downloaded and md5-checked when no source is
  given and the network is reachable),
- its extracted folder ``cifar-10-batches-py`` (or the folder that holds it),
- a folder or zip laid out as ``<train|test>/<class>/<file>`` (any Pillow format), such as
  ``cifar10-jpeg.zip``; one wrapping top-level folder is allowed.

Order (deterministic): the training images, then the test images; for the official batches
the order inside ``data_batch_1`` .. ``data_batch_5``, ``test_batch``; for a folder/zip the
classes in CIFAR order and the files of each class sorted by name.

The official batches are Python pickles. They are never unpickled: ``read_cifar_batch``
reads them with :func:`dpq.data.safe_pickle.parse_pickle_safely`, which rebuilds plain data
without importing or calling anything the file names, so a crafted file cannot run code;
any other content is rejected with a ``ValueError``.

Decoded arrays are cached under ``<cache>/cifar10/<key>/`` keyed by the source's sha256
(a file's digest is remembered by path, size and mtime; a folder is keyed by its file
list, sizes and mtimes), so the second load reads two ``.npy`` files.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dpq.data.cache import (
    cache_key,
    load_arrays,
    remembered_digest,
    resolve_cache_dir,
    save_arrays,
    tree_fingerprint,
)
from dpq.data.dataset import ImageDataset, ImageFileReader
from dpq.data.decode import (
    CorruptImageError,
    ImageStore,
    SkippedImagesWarning,
    decode_many,
    is_image_name,
)
from dpq.data.safe_pickle import parse_pickle_safely

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCH_NAMES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
TEST_BATCH_NAME = "test_batch"
CACHE_NAMESPACE = "cifar10"
CACHE_VERSION = "1"


class DatasetUnavailableError(FileNotFoundError):
    """The dataset is not on disk and could not be downloaded."""


# --------------------------------------------------------------------------- sources


def detect_cifar10_layout(source: str | os.PathLike[str]) -> str | None:
    """'archive', 'batches' or 'folder' when ``source`` looks like CIFAR-10, else None."""
    path = Path(source)
    if path.is_dir():
        if _batches_dir(path) is not None:
            return "batches"
        return "folder" if _split_prefix(ImageStore(str(path))) is not None else None
    if not path.is_file():
        return None
    if zipfile.is_zipfile(path):
        return "folder" if _split_prefix(ImageStore(str(path))) is not None else None
    if tarfile.is_tarfile(path):
        return "archive"
    return None


def _batches_dir(path: Path) -> Path | None:
    for candidate in (path, path / "cifar-10-batches-py"):
        if (candidate / BATCH_NAMES[0]).is_file():
            return candidate
    return None


def _split_prefix(store: ImageStore) -> str | None:
    """'' or 'top/' when the store holds 'train/' and 'test/' folders at that level and
    'train/' has at least one CIFAR-10 class folder (so another collection split into
    train/ and test/ is not taken for CIFAR-10)."""
    _files, folders = store.entries()
    folder_set = set(folders)
    tops = {f for f in folders if "/" not in f}
    candidates = [""] + [f"{top}/" for top in sorted(tops)] if len(tops) == 1 else [""]
    for prefix in candidates:
        if f"{prefix}train" in folder_set and f"{prefix}test" in folder_set:
            if any(f"{prefix}train/{name}" in folder_set for name in CIFAR10_CLASSES):
                return prefix
    return None


# --------------------------------------------------------------------------- download


def download_cifar10(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    url: str = CIFAR10_URL,
    md5: str = CIFAR10_MD5,
    timeout: float = 60.0,
) -> Path:
    """The official archive in the cache dir, downloaded first if missing; md5-verified.

    Raises ``DatasetUnavailableError`` (a ``FileNotFoundError``) when the download fails,
    with the ways to pass a local copy, and ``ValueError`` when the md5 does not match.
    """
    cache = resolve_cache_dir(cache_dir)
    target = cache / ARCHIVE_NAME
    if target.exists():
        got = remembered_digest(target, cache, "md5")
        if got != md5:
            raise ValueError(
                f"{target} has md5 {got} but the CIFAR-10 archive has md5 {md5}: the file is "
                "incomplete or not CIFAR-10; delete it to download again, or pass a local copy"
            )
        return target
    fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f".{ARCHIVE_NAME}.", suffix=".tmp")
    tmp = Path(tmp_name)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = response.headers.get("Content-Length")
            with tqdm(
                total=int(total) if total else None,
                unit="B",
                unit_scale=True,
                desc="downloading CIFAR-10",
                disable=None,
            ) as progress:
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    progress.update(len(block))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise DatasetUnavailableError(
            f"CIFAR-10 is not in the cache ({target}) and could not be downloaded from {url} "
            f"({reason}). Pass a local copy instead: load_cifar10('/path/to/{ARCHIVE_NAME}'), "
            "its extracted folder 'cifar-10-batches-py', or a folder/zip laid out as "
            "<train|test>/<class>/<image> (CLI: dpq data info PATH); or copy the archive to "
            f"{target}"
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != md5:
        tmp.unlink(missing_ok=True)
        raise ValueError(
            f"the file downloaded from {url} has md5 {digest.hexdigest()}, expected {md5}: the "
            "download was corrupted or the server sent something else; try again, or pass a "
            "local copy of the archive"
        )
    os.replace(tmp, target)
    return target


# --------------------------------------------------------------------------- loading


def load_cifar10(
    source: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    skip_corrupt: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> ImageDataset:
    """All 60,000 CIFAR-10 images, train then test, as uint8 (N, 32, 32, 3) + int64 (N,).

    Args:
        source: the official archive, its extracted folder, or a folder/zip of
            ``<train|test>/<class>/<image>``; None downloads the official archive into the
            cache dir (md5-checked) or uses the copy already there.
        cache_dir: where archives and decoded arrays are kept (default ``$DPQ_CACHE_DIR``
            or ``~/.cache/dpq``).
        skip_corrupt: skip undecodable images of a folder/zip with a warning instead of
            raising ``CorruptImageError``.
        workers: decoding threads for a folder/zip (default 1, the calling thread).
        progress: report decoding progress on stderr.
    """
    cache = resolve_cache_dir(cache_dir)
    if source is None:
        source = download_cifar10(cache)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"CIFAR-10 source {path} does not exist; pass {ARCHIVE_NAME}, its extracted "
            "folder, or a folder/zip of <train|test>/<class>/<image>, or no source to download"
        )
    # The cache is looked up before the layout is inspected: listing a 60,000-entry zip
    # costs more than reading the cached arrays.
    batches = _batches_dir(path) if path.is_dir() else None
    if batches is not None:
        fingerprint = "batches:" + "".join(
            remembered_digest(batches / name, cache) for name in (*BATCH_NAMES, TEST_BATCH_NAME)
        )
    elif path.is_dir():
        fingerprint = "tree:" + tree_fingerprint(path)
    else:
        fingerprint = "file:" + remembered_digest(path, cache)
    key = cache_key(CACHE_NAMESPACE, CACHE_VERSION, fingerprint)

    cached = load_arrays(cache, CACHE_NAMESPACE, key)
    if cached is not None:
        arrays, meta = cached
        skipped = [tuple(item) for item in meta.get("skipped", [])]
        if skipped and not skip_corrupt:
            raise CorruptImageError(*skipped[0])
        if skipped:
            total = len(arrays["labels"]) + len(skipped)
            warnings.warn(SkippedImagesWarning(len(skipped), total, skipped[0]), stacklevel=2)
        return ImageDataset(arrays["images"], arrays["labels"], list(CIFAR10_CLASSES), str(path))

    layout = "batches" if batches is not None else detect_cifar10_layout(path)
    if layout is None:
        raise ValueError(
            f"{path} is not a CIFAR-10 source: expected {ARCHIVE_NAME}, a folder holding "
            f"{BATCH_NAMES[0]} .. {TEST_BATCH_NAME}, or a folder/zip with train/ and test/ "
            "class folders; for another image collection use load_image_folder"
        )
    skipped: list[tuple[str, str]] = []
    if layout == "archive":
        images, labels = _read_archive(path)
    elif batches is not None:
        images, labels = _read_batches(lambda name: (batches / name).read_bytes(), str(batches))
    else:
        images, labels, skipped = _read_folder(path, skip_corrupt, workers, progress)
    save_arrays(
        cache,
        CACHE_NAMESPACE,
        key,
        {"images": images, "labels": labels},
        {"source": str(path), "layout": layout, "skipped": skipped, "num_images": len(labels)},
    )
    return ImageDataset(images, labels, list(CIFAR10_CLASSES), str(path))


def _read_archive(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

            def read(name: str) -> bytes:
                member = members.get(name)
                if member is None:
                    raise ValueError(
                        f"{path} has no '{name}' member: not the CIFAR-10 python archive "
                        f"({ARCHIVE_NAME} from {CIFAR10_URL})"
                    )
                handle = tar.extractfile(member)
                if handle is None:
                    raise ValueError(f"{path}: member '{name}' is not a regular file")
                return handle.read()

            return _read_batches(read, str(path))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ValueError(
            f"cannot read {path} as a tar archive ({exc}); the file is corrupt or incomplete: "
            "download it again or pass the extracted folder"
        ) from exc


def _read_batches(read: Callable[[str], bytes], where: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in (*BATCH_NAMES, TEST_BATCH_NAME):
        batch_images, batch_labels = read_cifar_batch(read(name), f"{where}/{name}")
        images.append(batch_images)
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def _read_folder(
    path: Path, skip_corrupt: bool, workers: int | None, progress: bool
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    store = ImageStore(str(path))
    names, labels = _folder_listing(store)
    decoded = decode_many(
        store,
        names,
        skip_corrupt=skip_corrupt,
        workers=workers,
        desc="decoding CIFAR-10",
        progress=progress,
    )
    label_array = np.asarray(labels, dtype=np.int64)[decoded.kept]
    return decoded.images, label_array, decoded.skipped


def cifar10_reader(
    source: str | os.PathLike[str], image_size: tuple[int, int] = (32, 32)
) -> ImageDataset:
    """CIFAR-10 from a folder or zip of ``<train|test>/<class>/<image>``, read on demand:
    an :class:`~dpq.data.ImageFileReader` (each image decoded, and resized to
    ``image_size``, when it is read) in the order of :func:`load_cifar10`."""
    store = ImageStore(os.fspath(source))
    names, labels = _folder_listing(store)
    return ImageDataset(
        ImageFileReader(store, names, image_size),
        np.asarray(labels, dtype=np.int64),
        list(CIFAR10_CLASSES),
        store.path,
    )


def _folder_listing(store: ImageStore) -> tuple[list[str], list[int]]:
    """The image names of a CIFAR-10 folder/zip, train then test, classes in CIFAR order,
    files by name; and their labels."""
    prefix = _split_prefix(store)
    path = store.path
    if prefix is None:
        raise ValueError(f"{path} has no train/ and test/ folders; not a CIFAR-10 folder/zip")
    files, folders = store.entries()
    names: list[str] = []
    labels: list[int] = []
    for split in ("train", "test"):
        split_dir = f"{prefix}{split}/"
        found = {f[len(split_dir) :] for f in folders if f.startswith(split_dir)}
        found = {f for f in found if "/" not in f}
        unexpected = sorted(found - set(CIFAR10_CLASSES))
        missing = [c for c in CIFAR10_CLASSES if c not in found]
        if unexpected or missing:
            raise ValueError(
                f"{store.describe(split_dir)} must hold one folder per CIFAR-10 class "
                f"({', '.join(CIFAR10_CLASSES)}); missing: {missing or 'none'}, unexpected: "
                f"{unexpected or 'none'}. Rename the folders, or use load_image_folder for "
                "another collection"
            )
        for class_index, class_name in enumerate(CIFAR10_CLASSES):
            class_dir = f"{split_dir}{class_name}/"
            class_files = [f for f in files if f.startswith(class_dir) and is_image_name(f)]
            if not class_files:
                raise ValueError(
                    f"class folder {store.describe(class_dir)} has no images; add its images "
                    "or check that the copy is complete"
                )
            names.extend(sorted(class_files))
            labels.extend([class_index] * len(class_files))
    return names, labels


# --------------------------------------------------------------------------- batch files


class BatchFormatError(ValueError):
    """A batch file that is not a plain-data pickle of a CIFAR-10 batch."""


def read_cifar_batch(data: bytes, where: str = "batch") -> tuple[np.ndarray, np.ndarray]:
    """One official CIFAR-10 batch file -> images uint8 (n, 32, 32, 3), labels int64 (n,).

    Parsed with ``parse_pickle_safely`` (no unpickling). Rows of the batch's ``data`` are
    1024 red, 1024 green, 1024 blue values of a 32x32 image in row-major order.
    """
    batch = parse_pickle_safely(data, where)
    if not isinstance(batch, dict):
        raise BatchFormatError(f"{where}: expected a dict with b'data' and b'labels'")
    batch = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    raw, labels = batch.get("data"), batch.get("labels")
    if not isinstance(raw, np.ndarray) or raw.ndim != 2 or raw.shape[1] != 3 * 32 * 32:
        raise BatchFormatError(f"{where}: 'data' must be an (n, 3072) array; not a CIFAR-10 batch")
    if not isinstance(labels, list) or len(labels) != len(raw):
        raise BatchFormatError(f"{where}: 'labels' must list one class per image")
    label_array = np.asarray(labels, dtype=np.int64)
    if label_array.size and (label_array.min() < 0 or label_array.max() >= len(CIFAR10_CLASSES)):
        raise BatchFormatError(f"{where}: labels outside 0..9; not a CIFAR-10 batch")
    images = raw.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), label_array
