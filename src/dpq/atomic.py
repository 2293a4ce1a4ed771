"""Atomic file writes: a temporary file in the target's folder, fsync, then ``os.replace``.

A reader sees the old file or the new one, never half of one; on any error the temporary
file is removed and the error propagates. The one home of every writer of whole files in
dpq: bytes, text and JSON (numpy values converted only when present; no torch).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary handle whose content replaces ``path`` only when the block succeeds.

    For writers that stream (e.g. ``np.savez(handle, ...)``) instead of holding the bytes.
    Parent folders are created; on any error the temporary file is removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders are created); returns the path."""
    with atomic_writer(path) as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays, and paths, as plain JSON values."""
    import numpy as np  # lazy: the writers themselves need only the standard library

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_json_atomic(
    path: str | os.PathLike[str], payload: Any, *, indent: int | None = 2, sort_keys: bool = False
) -> Path:
    """Write ``payload`` as JSON text to ``path`` atomically; returns the path.

    ``indent=None`` writes one line; numpy values are converted; NaN is refused
    (``ValueError``), so every file is strict JSON."""
    text = json.dumps(
        payload, indent=indent, sort_keys=sort_keys, allow_nan=False, default=_json_default
    )
    return write_text_atomic(path, text + "\n")


def check_writable_file(path: str | os.PathLike[str], what: str = "the output") -> Path:
    """Check, before any work, that ``path`` can be written as a file: ValueError (one
    sentence naming ``what``) when it is a directory, lies under a file, or its nearest
    existing folder is not writable. Returns the path."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{what} {target} is a directory; give a file name inside it.")
    parent = next((p for p in target.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise ValueError(f"{what} {target} lies under {parent}, which is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {target}: {parent} is not writable; choose another place.")
    if target.exists() and not os.access(target, os.W_OK) and not os.access(parent, os.W_OK):
        raise ValueError(f"{what} {target} is not writable.")
    return target
