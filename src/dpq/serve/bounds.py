"""How much one request may ask of the service: the bounds, in one place.

The request schemas (:mod:`dpq.serve.schemas`) declare them, so they are in the OpenAPI
description and a request beyond them gets 422 before any work; :class:`Collection.search
<dpq.serve.collection.Collection.search>` checks the same bounds with
:func:`check_search_bounds` for callers that skip HTTP. The index takes far more
(``k`` up to :data:`dpq.index.MAX_K`); these bounds keep one answer small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpq.index import MAX_K

__all__ = [
    "CodeLengths",
    "MAX_EXCLUDED",
    "MAX_FILTER_LABELS",
    "MAX_ID",
    "MAX_IMAGES_PER_REQUEST",
    "MAX_NPROBE",
    "MAX_OFFSET",
    "MAX_QUERIES_PER_REQUEST",
    "MAX_RERANK_CANDIDATES",
    "MAX_RESULTS",
    "MAX_VECTORS_PER_REQUEST",
    "check_search_bounds",
]

MAX_RESULTS = 1000  # k: results in one answer
MAX_OFFSET = 10_000  # ranks skipped (paging)
MAX_RERANK_CANDIDATES = 100_000  # shortlist size of a re-ranked search
MAX_NPROBE = MAX_K  # cells to visit: the index's own bound (it visits at most every cell)
MAX_VECTORS_PER_REQUEST = 10_000  # vectors (and their labels and names) in one add
MAX_IMAGES_PER_REQUEST = 1000  # images in one add (base64 or uploaded files)
MAX_QUERIES_PER_REQUEST = 256  # vectors or ids in one batch search
MAX_EXCLUDED = 10_000  # ids a search may exclude
MAX_FILTER_LABELS = 1000  # labels a filter may name
MAX_ID = 2**63 - 1  # item ids are int64, never negative (-1 marks "no result" in the index)


def _check(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer in {low}..{high}; got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}; got {value}.")


def check_search_bounds(
    k: Any, offset: Any, rerank_candidates: Any = None, nprobe: Any = None
) -> None:
    """ValueError naming the first of k (1..MAX_RESULTS), offset (0..MAX_OFFSET),
    rerank_candidates (1..MAX_RERANK_CANDIDATES) or nprobe (1..MAX_NPROBE) out of bounds;
    None for the last two means "not given"."""
    _check("k", k, 1, MAX_RESULTS)
    _check("offset", offset, 0, MAX_OFFSET)
    if rerank_candidates is not None:
        _check("rerank_candidates", rerank_candidates, 1, MAX_RERANK_CANDIDATES)
    if nprobe is not None:
        _check("nprobe", nprobe, 1, MAX_NPROBE)


@dataclass(frozen=True)
class CodeLengths:
    """The code lengths a search may ask for: l * bits_per_level bits for l = 1..num_levels
    (an index of L levels of K codewords: bits_per_level = log2 K)."""

    num_levels: int
    bits_per_level: int

    @classmethod
    def of(cls, num_levels: int, codebook_size: int) -> CodeLengths:
        return cls(int(num_levels), max(1, (int(codebook_size) - 1).bit_length()))

    @property
    def bits(self) -> list[int]:
        return [level * self.bits_per_level for level in range(1, self.num_levels + 1)]

    def levels(self, bits: Any, name: str = "bits") -> int:
        """num_levels of a code length in bits (None: all levels). ValueError if not offered."""
        if bits is None:
            return self.num_levels
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise ValueError(f"{name} must be an integer, one of {self.bits}; got {bits!r}.")
        if bits not in self.bits:
            raise ValueError(
                f"{name} must be one of {self.bits} (this index has {self.num_levels} levels "
                f"of {self.bits_per_level} bits); got {bits}."
            )
        return int(bits) // self.bits_per_level

    def rerank_levels(self, rerank: Any, levels: int) -> int | None:
        """num_levels of the shortlist's code length ``rerank`` (None: no re-ranking), which
        must be shorter than the ranking's ``levels``."""
        if rerank is None:
            return None
        shortlist = self.levels(rerank, "rerank")
        if shortlist >= levels:
            raise ValueError(
                f"rerank must be shorter than bits={levels * self.bits_per_level} (it is the "
                f"code length of the shortlist); got {rerank}."
            )
        return shortlist
