"""Where downloaded archives and decoded arrays are kept, and how they are keyed.

The cache directory is ``cache_dir`` when given, else ``$DPQ_CACHE_DIR``, else
``~/.cache/dpq``. Decoded arrays live in ``<cache>/<namespace>/<key>/`` as ``.npy`` files
plus a ``meta.json``; the key is derived from the source's checksum, so a changed source
is decoded again. Every file is written atomically (a temporary name in the same folder,
then ``os.replace``), and a cache entry appears whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dpq.atomic import write_json_atomic

CHECKSUM_INDEX = "checksums.json"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$DPQ_CACHE_DIR``, else ``~/.cache/dpq`` (created if missing)."""
    if cache_dir is None:
        cache_dir = os.environ.get("DPQ_CACHE_DIR") or Path.home() / ".cache" / "dpq"
    path = Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Hex digest of a file's content (read in 1 MiB blocks)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def remembered_digest(
    path: str | os.PathLike[str], cache_dir: Path, algorithm: str = "sha256"
) -> str:
    """Digest of a file's content, computed once and remembered by (path, size, mtime).

    The index is ``<cache>/checksums.json``; a file whose size or modification time
    changed is hashed again. This keeps the second load of a large archive fast.
    """
    resolved = str(Path(path).resolve())
    stat = os.stat(resolved)
    record_key = f"{algorithm}:{resolved}"
    stamp = [stat.st_size, stat.st_mtime_ns]
    index_path = cache_dir / CHECKSUM_INDEX
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    record = index.get(record_key)
    if isinstance(record, dict) and record.get("stamp") == stamp:
        return str(record["digest"])
    digest = file_digest(resolved, algorithm)
    index[record_key] = {"stamp": stamp, "digest": digest}
    write_json_atomic(index_path, index, indent=1, sort_keys=True)
    return digest


def tree_fingerprint(root: str | os.PathLike[str]) -> str:
    """sha256 over the sorted (relative path, size, mtime) of every file under ``root``.

    Used to key folders (hashing 60,000 small files' contents would cost more than it saves).
    """
    digest = hashlib.sha256()
    entries = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            full = os.path.join(dirpath, filename)
            stat = os.stat(full)
            entries.append(f"{os.path.relpath(full, root)}\0{stat.st_size}\0{stat.st_mtime_ns}")
    for entry in sorted(entries):
        digest.update(entry.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def cache_key(*parts: str) -> str:
    """A short stable key (32 hex chars) from strings that identify a cached result."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def load_arrays(
    cache_dir: Path, namespace: str, key: str
) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The arrays and meta data stored under ``key``, or None when absent or unreadable."""
    entry = cache_dir / namespace / key
    try:
        meta = json.loads((entry / "meta.json").read_text())
        arrays = {
            name: np.load(entry / f"{name}.npy", allow_pickle=False) for name in meta["arrays"]
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return arrays, meta


def save_arrays(
    cache_dir: Path,
    namespace: str,
    key: str,
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
) -> Path:
    """Store ``arrays`` (as .npy) and ``meta`` (JSON) under ``key``, atomically.

    The entry is written into a temporary folder beside it and renamed into place, so a
    reader sees either the complete entry or none. Returns the entry folder.
    """
    parent = cache_dir / namespace
    parent.mkdir(parents=True, exist_ok=True)
    entry = parent / key
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{key}.", suffix=".tmp"))
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        full_meta = {**meta, "arrays": sorted(arrays)}
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1, sort_keys=True) + "\n")
        if entry.exists():
            shutil.rmtree(entry)
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / "meta.json").exists():  # a concurrent writer did not win either
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry
