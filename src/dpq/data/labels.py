"""Label embeddings: one word vector per class (the z_n of the adaptive margin loss)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def load_word_vectors(
    path: str | os.PathLike[str], num_classes: int | None = None, dim: int | None = None
) -> np.ndarray:
    """Read a word-vector file: one whitespace-separated row of floats per class.

    Args:
        path: the text file (as in ``shared/data/wordvec/``), rows in class order.
        num_classes: when given, the number of rows must equal it.
        dim: when given, the number of columns must equal it (300 for word2vec).

    Returns float32 (C, dim). Raises ``ValueError`` on a count mismatch, ragged rows or
    non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word-vector file {path} does not exist")
    rows: list[list[float]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                row = [float(p) for p in parts]
            except ValueError as exc:
                raise ValueError(
                    f"line {number} of word-vector file {path} is not all numbers ({exc})"
                ) from exc
            if rows and len(row) != len(rows[0]):
                raise ValueError(
                    f"line {number} of word-vector file {path} has {len(row)} values but the "
                    f"first row has {len(rows[0])}; every class needs a vector of the same length"
                )
            rows.append(row)
    if not rows:
        raise ValueError(f"word-vector file {path} is empty; expected one row per class")
    vectors = np.asarray(rows, dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise ValueError(f"word-vector file {path} contains NaN or infinite values")
    if num_classes is not None and len(vectors) != num_classes:
        raise ValueError(
            f"word-vector file {path} has {len(vectors)} rows but the dataset has {num_classes} "
            "classes; pass the file made for this dataset (one row per class, in class order)"
        )
    if dim is not None and vectors.shape[1] != dim:
        raise ValueError(
            f"word-vector file {path} has vectors of length {vectors.shape[1]} but {dim} is "
            "expected; pass vectors of the embedding size the model uses"
        )
    return vectors
