"""The index file: one uncompressed .npz (a zip of .npy members, no pickle) with a checksum.

Format version 2 (written since the partitioned index):

- members ``codebooks`` float32 (L, K, D), ``codes`` (N, W) uint8/uint16 in the scan
  layout (W = L, or L rounded up to a multiple of 4 for uint8), ``norms`` float32 (N,)
  (squared norm of each full reconstruction), ``ids`` int64 (N,), ``offsets`` int64
  (K^p + 1,) when partitioned, optionally ``labels``, and ``header``: a JSON string;
- every array's data starts at a 64-byte-aligned offset of the file, so it can be
  memory-mapped in place (``np.load`` cannot map the members of an .npz; this module reads
  the zip directory and the .npy headers itself and maps the bytes behind them);
- the header holds ``array_sha256``: per array, sha256 over ``name|dtype|shape|`` followed
  by the sha256 digests of its bytes in 64 MiB blocks (blocks hash in parallel threads),
  and ``checksum_sha256`` over the header itself (with those digests).

Version 1 files (``codebooks``, ``codes`` (N, L), ``ids``, optional ``labels``; one sha256
over the header text and every array in name order) are still read.

Nothing here is specific to DPQ beyond the names; numpy and the standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpq.atomic import atomic_writer

FORMAT_NAME = "dpq-index"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
HASH_BLOCK = 64 * 2**20
_ALIGN = 64
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... name length, extra length
_HASH_THREADS = min(8, os.cpu_count() or 1)


class IndexFileError(ValueError):
    """An index file that cannot be read: truncated, tampered, or of another format version."""


@dataclass(frozen=True)
class StreamedArray:
    """An array written in pieces: ``chunks()`` yields arrays of ``dtype`` whose rows,
    concatenated, make the (shape) array. For arrays too big to hold twice in memory."""

    dtype: np.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[np.ndarray]]


ArraySource = np.ndarray | StreamedArray


# ------------------------------------------------------------------ digests


def _member_prefix(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    return f"{name}|{np.dtype(dtype).str}|{tuple(int(n) for n in shape)}|".encode()


class BlockHasher:
    """sha256 of ``prefix`` + the sha256 digests of the data's consecutive HASH_BLOCK-byte
    blocks, fed in any number of pieces (the version-2 array digest)."""

    def __init__(self, prefix: bytes) -> None:
        self._outer = hashlib.sha256(prefix)
        self._block = hashlib.sha256()
        self._filled = 0

    def update(self, data: memoryview) -> None:
        data = data.cast("B") if data.ndim != 1 or data.itemsize != 1 else data
        while len(data):
            room = HASH_BLOCK - self._filled
            piece, data = data[:room], data[room:]
            self._block.update(piece)
            self._filled += len(piece)
            if self._filled == HASH_BLOCK:
                self._outer.update(self._block.digest())
                self._block = hashlib.sha256()
                self._filled = 0

    def hexdigest(self) -> str:
        outer = self._outer.copy()
        if self._filled:
            outer.update(self._block.digest())
        return outer.hexdigest()


def _bytes_of(arr: np.ndarray) -> memoryview:
    """The raw C-order bytes of arr as a flat byte memoryview (no copy when contiguous)."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    return memoryview(flat.view(np.uint8)) if flat.size else memoryview(b"")


def array_digest(name: str, arr: np.ndarray) -> str:
    """Version-2 digest of one array; its blocks are hashed on several threads (hashlib
    releases the GIL), so a memory-mapped array is read once, at disk or page-cache speed."""
    data = _bytes_of(arr)
    blocks = [data[i : i + HASH_BLOCK] for i in range(0, len(data), HASH_BLOCK)]
    outer = hashlib.sha256(_member_prefix(name, arr.dtype, arr.shape))

    def digest(block: memoryview) -> bytes:
        return hashlib.sha256(block).digest()

    if len(blocks) > 1 and _HASH_THREADS > 1:
        with ThreadPoolExecutor(max_workers=_HASH_THREADS) as pool:
            for part in pool.map(digest, blocks):
                outer.update(part)
    else:
        for block in blocks:
            outer.update(digest(block))
    return outer.hexdigest()


def _version1_digest(arrays: Mapping[str, np.ndarray], header_without_checksum: str) -> str:
    """The version-1 checksum: sha256 over the header text, then every array in name order."""
    digest = hashlib.sha256()
    digest.update(header_without_checksum.encode())
    for name in sorted(arrays):
        arr = arrays[name]
        digest.update(_member_prefix(name, arr.dtype, arr.shape))
        data = _bytes_of(arr)
        for i in range(0, len(data), HASH_BLOCK):
            digest.update(data[i : i + HASH_BLOCK])
    return digest.hexdigest()


def header_checksum(header: Mapping[str, Any]) -> str:
    """sha256 of the header's JSON (sorted keys) without its ``checksum_sha256`` entry."""
    rest = {key: value for key, value in header.items() if key != "checksum_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------ writing


def _npy_header(dtype: np.dtype, shape: tuple[int, ...], data_position: int) -> bytes:
    """A .npy version-1.0 header padded so that the data after it starts at a multiple of
    _ALIGN bytes of the file (``data_position`` is where the header starts)."""
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(int(n) for n in shape)!r}, }}"
    fixed = len(np.lib.format.MAGIC_PREFIX) + 2 + 2  # magic, version, header length
    length = len(text) + 1
    length += (-(data_position + fixed + length)) % _ALIGN
    if length > 65535:
        raise ValueError(f"array shape {shape} makes a .npy header too long to write.")
    padded = text + " " * (length - len(text) - 1) + "\n"
    return np.lib.format.MAGIC_PREFIX + b"\x01\x00" + struct.pack("<H", length) + padded.encode()


def _write_member(archive: zipfile.ZipFile, handle: Any, name: str, source: ArraySource) -> str:
    """Write one array member into archive (writing to the binary file handle); returns
    its version-2 digest."""
    if isinstance(source, StreamedArray):
        dtype, shape, chunks = np.dtype(source.dtype), source.shape, source.chunks()
    else:
        dtype, shape, chunks = source.dtype, source.shape, [source]
    info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    hasher = BlockHasher(_member_prefix(name, dtype, shape))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    written = 0
    with archive.open(info, "w", force_zip64=True) as member:
        member.write(_npy_header(dtype, shape, handle.tell()))
        for chunk in chunks:
            data = _bytes_of(np.asarray(chunk, dtype=dtype))
            hasher.update(data)
            member.write(data)
            written += len(data)
    if written != expected:
        raise RuntimeError(f"array {name!r} got {written} bytes but its shape needs {expected}")
    return hasher.hexdigest()


def write_index_file(
    path: str | os.PathLike[str], header: Mapping[str, Any], arrays: Mapping[str, ArraySource]
) -> Path:
    """Write a version-2 index file atomically (temp file, then rename); returns the path.

    ``header`` (JSON-serialisable) gets ``format``, ``format_version``, ``array_sha256`` and
    ``checksum_sha256`` added. Arrays may be streamed (:class:`StreamedArray`), so a file
    bigger than memory can be written from memory-mapped sources.
    """
    target = Path(path)
    full = {**header, "format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    digests: dict[str, str] = {}
    with atomic_writer(target) as handle:
        with zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name in sorted(arrays):
                digests[name] = _write_member(archive, handle, name, arrays[name])
            full["array_sha256"] = digests
            full["checksum_sha256"] = header_checksum(full)
            text = np.array(json.dumps(full, sort_keys=True))
            _write_member(archive, handle, "header", text)
    return target


# ------------------------------------------------------------------ reading


@dataclass(frozen=True)
class _Member:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    offset: int  # of the first data byte in the file

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _members(source: Path) -> dict[str, _Member]:
    """The .npy members of an uncompressed zip, located by their zip and .npy headers."""
    members: dict[str, _Member] = {}
    size = source.stat().st_size
    with zipfile.ZipFile(source) as archive, open(source, "rb") as handle:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[: -len(".npy")]
            if info.compress_type != zipfile.ZIP_STORED:
                raise IndexFileError(
                    f"{source}: member {name!r} is compressed; dpq index files are stored "
                    "uncompressed (write them with DPQIndex.save)."
                )
            handle.seek(info.header_offset)
            signature, name_len, extra_len = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
            if signature != b"PK\x03\x04":
                raise IndexFileError(f"{source}: member {name!r} has a damaged zip header.")
            start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            handle.seek(start)
            try:
                version = np.lib.format.read_magic(handle)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
                else:
                    raise ValueError(f".npy version {version} is not used by dpq index files")
            except ValueError as exc:
                raise IndexFileError(f"{source}: member {name!r}: {exc}") from None
            if dtype.hasobject:
                raise IndexFileError(f"{source}: member {name!r} holds Python objects.")
            member = _Member(name, dtype, tuple(shape), bool(fortran), handle.tell())
            if member.offset + member.nbytes > min(size, start + info.file_size):
                raise IndexFileError(f"{source}: member {name!r} is truncated.")
            members[name] = member
    return members


def _read_member(source: Path, member: _Member, mmap: bool) -> np.ndarray:
    order = "F" if member.fortran_order else "C"
    if member.nbytes == 0:
        arr = np.empty(member.shape, member.dtype, order=order)
    elif mmap:
        mapped = np.memmap(
            source, member.dtype, "r", offset=member.offset, shape=member.shape, order=order
        )
        arr = mapped.view(np.ndarray)  # a plain array for numba; keeps the map alive
    else:
        count = member.nbytes // member.dtype.itemsize
        with open(source, "rb") as handle:
            handle.seek(member.offset)
            arr = np.fromfile(handle, member.dtype, count).reshape(member.shape, order=order)
    if mmap:
        arr.flags.writeable = False
    elif member.fortran_order:
        arr = np.array(arr, order="C")
    return arr


def read_index_file(
    path: str | os.PathLike[str], mmap: bool = False, verify: bool = True
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, arrays) of an index file of version 1 or 2.

    mmap: map the arrays (read-only) from the file instead of reading them into memory
    (pages are read on first use). verify: check every array against its digest (reads the whole file once);
    without it only the header's own checksum and the array sizes are checked.
    Raises FileNotFoundError if absent, IndexFileError (a ValueError) naming the file if it
    is truncated, tampered with, or of another format.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"index file not found: {source}")
    try:
        members = _members(source)
    except (zipfile.BadZipFile, EOFError, OSError, struct.error) as exc:
        raise IndexFileError(
            f"{source} is not a readable dpq index file (truncated or corrupted?): {exc}"
        ) from None
    if "header" not in members:
        raise IndexFileError(f"{source} is not a dpq index file: it has no header entry.")
    try:
        header = json.loads(str(_read_member(source, members.pop("header"), mmap=False)))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise IndexFileError(f"{source} has an unreadable header: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        format_name = header.get("format") if isinstance(header, dict) else None
        raise IndexFileError(f"{source} is not a dpq index file (format {format_name!r}).")
    version = header.get("format_version")
    if version not in READABLE_VERSIONS:
        raise IndexFileError(
            f"{source} has index format version {version!r}, but this dpq reads versions "
            f"{list(READABLE_VERSIONS)}; rebuild it with `dpq encode` or use the dpq release "
            "that wrote it."
        )
    try:
        arrays = {name: _read_member(source, m, mmap) for name, m in members.items()}
    except (OSError, ValueError) as exc:
        raise IndexFileError(f"{source}: cannot read its arrays: {exc}") from None
    stored = header.pop("checksum_sha256", None)
    if version == 1:
        actual = _version1_digest(arrays, json.dumps(header, sort_keys=True))
        if stored != actual:
            _checksum_error(source, stored, actual)
        return header, arrays
    actual = header_checksum(header)
    if stored != actual:
        _checksum_error(source, stored, actual)
    expected = header.get("array_sha256")
    if not isinstance(expected, dict) or set(expected) != set(arrays):
        raise IndexFileError(
            f"{source}: its header lists arrays {sorted(expected or {})} but the file holds "
            f"{sorted(arrays)}; the file was modified or damaged; rebuild it."
        )
    if verify:
        for name, arr in arrays.items():
            actual = array_digest(name, arr)
            if actual != expected[name]:
                _checksum_error(source, expected[name], actual, name)
    return header, arrays


def _checksum_error(source: Path, stored: Any, actual: str, name: str | None = None) -> None:
    what = f" (array {name!r})" if name else ""
    raise IndexFileError(
        f"{source} failed its checksum{what} (stored {str(stored)[:12]}, computed "
        f"{actual[:12]}): the file was modified or damaged; rebuild it."
    )
