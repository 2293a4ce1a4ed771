"""Codebooks and the code contract: their checks and digest, greedy residual encoding, and
decoding codes back to vectors. numpy only.

Vocabulary: ``num_levels`` L, ``codebook_size`` K, ``dim`` D; codebooks are float32
(L, K, D); codes are (N, L) uint8 when K <= 256 else uint16; the reconstruction of an item
at prefix l is ``sum_{i<l} codebooks[i, codes[:, i]]``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import numpy as np

__all__ = [
    "ASSIGNMENTS",
    "check_codebooks",
    "code_dtype",
    "codebooks_sha256",
    "decode",
    "greedy_residual_encode",
]

ASSIGNMENTS = ("euclidean", "cosine")
# Rows encoded per batch by greedy_residual_encode.
_ENCODE_BATCH = 4096


def check_codebooks(codebooks: Any) -> np.ndarray:
    """float32 C-contiguous (L, K, D) codebooks, K <= 65536, finite; else a ValueError."""
    arr = np.asarray(codebooks)
    if arr.ndim != 3:
        raise ValueError(
            f"codebooks must be a 3-D array (num_levels, codebook_size, dim); got shape {arr.shape}."
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"codebooks must be floating point; got dtype {arr.dtype}.")
    num_levels, codebook_size, dim = arr.shape
    if num_levels < 1 or codebook_size < 1 or dim < 1:
        raise ValueError(f"codebooks must have no empty axis; got shape {arr.shape}.")
    if codebook_size > 65536:
        raise ValueError(
            f"codebook_size must be at most 65536 (uint16 codes); got {codebook_size}."
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("codebooks contain NaN or inf values; check the model that produced them.")
    return arr


def code_dtype(codebook_size: int) -> np.dtype:
    """uint8 for K <= 256, else uint16."""
    return np.dtype(np.uint8) if codebook_size <= 256 else np.dtype(np.uint16)


def codebooks_sha256(codebooks: np.ndarray) -> str:
    """sha256 of the float32 little-endian codebook bytes; identifies a model's codebooks."""
    return hashlib.sha256(np.ascontiguousarray(codebooks, dtype="<f4").tobytes()).hexdigest()


def greedy_residual_encode(
    features: Any,
    codebooks: Any,
    assignment: Literal["euclidean", "cosine"] = "euclidean",
    num_levels: int | None = None,
) -> np.ndarray:
    """Hard-assign features to codes level by level (the shared encoding contract).

    x_1 = x; code_l = argmin_k ||x_l - C_l[k]||^2 ("euclidean") or argmax_k cos(x_l, C_l[k])
    ("cosine", the reference code's rule); x_{l+1} = x_l - C_l[code_l].

    features: float (N, D); codebooks: float32 (L, K, D). Returns codes (N, num_levels),
    uint8 when K <= 256 else uint16. Ties go to the lowest codeword index.
    """
    books = check_codebooks(codebooks)
    total_levels, codebook_size, dim = books.shape
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {ASSIGNMENTS}; got {assignment!r}.")
    levels = total_levels if num_levels is None else int(num_levels)
    if not 1 <= levels <= total_levels:
        raise ValueError(f"num_levels must be in 1..{total_levels}; got {num_levels}.")
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(
            f"features must have shape (N, {dim}) to match the codebooks; got shape {x.shape}."
        )
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"features must be real numbers; got dtype {x.dtype}.")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise ValueError(f"features contain NaN or inf (first bad row: {bad}); clean them first.")
    codes = np.empty((x.shape[0], levels), dtype=code_dtype(codebook_size))
    sq_norms = np.einsum("lkd,lkd->lk", books, books)
    inv_norms = 1.0 / np.maximum(np.sqrt(sq_norms), np.finfo(np.float32).tiny)
    for start in range(0, x.shape[0], _ENCODE_BATCH):
        residual = x[start : start + _ENCODE_BATCH].copy()
        for level in range(levels):
            dots = residual @ books[level].T
            if assignment == "euclidean":
                chosen = np.argmin(sq_norms[level] - 2.0 * dots, axis=1)
            else:
                chosen = np.argmax(dots * inv_norms[level], axis=1)
            codes[start : start + len(residual), level] = chosen
            residual -= books[level][chosen]
    return codes


def decode(codes: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """float32 (N, D) reconstructions of checked integer codes (N, l), l <= L, from float32
    codebooks (L, K, D): the sum of each row's first l codewords."""
    out = np.zeros((codes.shape[0], codebooks.shape[2]), np.float32)
    for level in range(codes.shape[1]):
        out += codebooks[level][codes[:, level]]
    return out
