"""Checks of the integer settings every searcher shares (k, a code prefix, item ids), in one
place.

numpy only: the index, the baselines and the service import these, so a bad ``k`` gets the
same answer everywhere.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["MAX_K", "check_ids", "check_k", "check_num_levels"]

# Largest k accepted by a search. k above ntotal is cut to ntotal (the result has
# min(k, ntotal) columns), so this bound only turns typos and overflowing values into errors.
MAX_K = 2**31 - 1


def check_k(k: Any, name: str = "k") -> int:
    """k as an int in 1..MAX_K (a bool is not an int here), else a ValueError naming it.

    ``name`` names the argument in the message (e.g. "nprobe", "rerank_candidates").
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ValueError(f"{name} must be a positive integer; got {k!r}.")
    if k <= 0:
        raise ValueError(f"{name} must be a positive integer; got {name}={k} (at least 1).")
    if k > MAX_K:
        raise ValueError(
            f"{name}={k} is beyond the largest accepted value {MAX_K}; results have at most "
            f"ntotal columns anyway, so pass at most the number of items you want."
        )
    return int(k)


def check_num_levels(
    num_levels: Any, total_levels: int, codebook_size: int, name: str = "num_levels"
) -> int:
    """A code prefix length in 1..total_levels (None: total_levels), else a ValueError that
    says how many levels of how many bits the index has."""
    if num_levels is None:
        return total_levels
    if isinstance(num_levels, bool) or not isinstance(num_levels, int | np.integer):
        raise ValueError(f"{name} must be an integer in 1..{total_levels}; got {num_levels!r}.")
    if not 1 <= num_levels <= total_levels:
        bits = int(math.log2(codebook_size)) if codebook_size > 1 else 0
        raise ValueError(
            f"{name} must be in 1..{total_levels} (this index has {total_levels} levels of "
            f"{bits} bits); got {num_levels}."
        )
    return int(num_levels)


def check_ids(ids: Any, n: int) -> np.ndarray:
    """int64 (n,) ids of n new items: integers, >= 0, unique among themselves, else a
    ValueError saying which (whether they are already stored is the index's own check)."""
    arr = np.asarray(ids)
    if arr.shape != (n,) or (n and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"ids must be int (n,) with n = {n} items; got {arr.dtype} {arr.shape}.")
    arr = arr.astype(np.int64)
    if n and arr.min() < 0:
        raise ValueError(f"ids must be >= 0 (-1 marks padding in results); got {arr.min()}.")
    if np.unique(arr).shape[0] != n:
        raise ValueError("ids must be unique; the given ids contain duplicates.")
    return arr
