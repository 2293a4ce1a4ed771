"""Label embeddings: one word vector per class (the z_n of the adaptive margin loss)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ORTHOGONAL = "orthogonal"


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_word_vectors(
    path: str | os.PathLike[str], num_classes: int | None = None, dim: int | None = None
) -> np.ndarray:
    """Read a word-vector file: one whitespace-separated row of floats per class.

    Args:
        path: the text file (as in ``shared/data/wordvec/``), rows in class order.
        num_classes: when given, the number of rows must equal it.
        dim: when given, the number of columns must equal it (300 for word2vec).

    Returns float32 (C, dim). Raises ``ValueError`` naming the file (and the row) on a
    count mismatch, ragged rows, text that is not numbers, non-finite values or an all-zero
    row (its cosine similarity is undefined).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"word-vector file {path} is a directory; pass the text file inside it (one row of "
            "numbers per class)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"word-vector file {path} does not exist")
    rows: list[list[float]] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    row = [float(p) for p in parts]
                except ValueError:
                    bad = next(p for p in parts if not _is_number(p))
                    raise ValueError(
                        f"line {number} of word-vector file {path} holds {_shorten(bad)!r}, which "
                        "is not a number; the file must hold whitespace-separated numbers, one "
                        "row per class (commas are not separators)"
                    ) from None
                if rows and len(row) != len(rows[0]):
                    raise ValueError(
                        f"line {number} of word-vector file {path} has {len(row)} values but "
                        f"the first row has {len(rows[0])}; every class needs a vector of the "
                        "same length"
                    )
                rows.append(row)
    except UnicodeDecodeError:
        raise ValueError(
            f"word-vector file {path} is not a text file (not UTF-8); pass the text file with "
            "one whitespace-separated row of numbers per class"
        ) from None
    if not rows:
        raise ValueError(f"word-vector file {path} is empty; expected one row per class")
    vectors = np.asarray(rows, dtype=np.float32)
    bad_rows = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad_rows.size:
        raise ValueError(
            f"row {bad_rows[0] + 1} of word-vector file {path} contains NaN or infinite values"
        )
    zero_rows = np.flatnonzero(~vectors.any(axis=1))
    if zero_rows.size:
        raise ValueError(
            f"row {zero_rows[0] + 1} of word-vector file {path} is all zeros; its cosine "
            "similarity is undefined, so every class needs a non-zero vector"
        )
    if num_classes is not None and len(vectors) != num_classes:
        raise ValueError(
            f"word-vector file {path} has {len(vectors)} rows but the dataset has {num_classes} "
            "classes; pass the file made for this dataset (one row per class, in class order)"
        )
    if dim is not None and vectors.shape[1] != dim:
        raise ValueError(
            f"word-vector file {path} has vectors of length {vectors.shape[1]} but {dim} is "
            "expected; pass vectors of the embedding size the model uses (--dim)"
        )
    return vectors


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def orthogonal_label_embeddings(num_classes: int, dim: int, seed: int = 0) -> np.ndarray:
    """Seeded random orthonormal class vectors, float32 (C, D), for data without word vectors.

    With them the adaptive margin is 1 for every pair of classes: L_S becomes a plain
    cosine-margin loss towards one fixed direction per class.
    """
    if dim < num_classes:
        raise ValueError(
            f"orthogonal label embeddings need dim >= num_classes; got dim {dim} for "
            f"{num_classes} classes (raise --dim, or pass --word-vectors PATH)."
        )
    gaussian = np.random.default_rng(seed).normal(size=(dim, num_classes))
    q, _ = np.linalg.qr(gaussian)
    return np.ascontiguousarray(q.T, dtype=np.float32)


def resolve_word_vectors(
    spec: str | os.PathLike[str] | None, num_classes: int, dim: int, seed: int = 0
) -> np.ndarray | None:
    """The label word vectors a run uses, float32 (C, D), or None when ``spec`` is None.

    ``spec`` is a word-vector file (:func:`load_word_vectors`, checked against C and D) or
    ``"orthogonal"`` (:func:`orthogonal_label_embeddings` seeded with ``seed``).
    """
    if spec is None:
        return None
    if str(spec) == ORTHOGONAL:
        return orthogonal_label_embeddings(num_classes, dim, seed)
    return load_word_vectors(spec, num_classes=num_classes, dim=dim)
