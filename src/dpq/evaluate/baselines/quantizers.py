"""Quantization baselines from faiss, searched with asymmetric distance (float query vs codes).

All use codebooks of 256 codewords (8 bits each), so a ``bits``-long code has
``M = bits / 8`` codebooks:

- ``PQ``: product quantization, M subspaces (``faiss.IndexPQ``). The dimension is
  zero-padded to a multiple of M (padding changes no distance).
- ``OPQ``: a learned rotation, then PQ (``faiss.OPQMatrix`` + ``IndexPQ`` inside an
  ``IndexPreTransform``); the rotation maps D to the next multiple of M.
- ``RQ``: residual quantization, M stacked codebooks over the full dimension, beam-search
  encoding (``faiss.IndexResidualQuantizer``; the stacked/additive family of SQ).
- ``LSQ``: local search quantization, M additive codebooks (``faiss.IndexLocalSearchQuantizer``).

PQ/OPQ search with per-subspace lookup tables. RQ/LSQ search with lookup tables plus the
exact squared norm of each reconstruction (``ST_norm_float``), which faiss stores as a
float32 beside the code: their ``code_size`` is ``bits / 8 + 4`` bytes (a DPQ index keeps
the same norms beside its codes). The distance is the squared Euclidean distance from the
float query to the item's reconstruction in every case.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any, ClassVar, Self

import faiss
import numpy as np

from dpq.evaluate.baselines.base import Baseline, check_k, order_ties_by_id

CODEWORD_BITS = 8
CODEWORDS = 2**CODEWORD_BITS
FAISS_POINTS_PER_CENTROID = 39
"""faiss warns when k-means gets fewer training points than this per centroid."""
_FAISS_FEW_POINTS = re.compile(rb"WARNING clustering \d+ points to \d+ centroids: please provide")


@contextlib.contextmanager
def faiss_training_output() -> Iterator[None]:
    """Hide faiss's "please provide at least N training points" lines (it prints one per
    k-means run, about a hundred in one evaluation; dpq says it once, in a note) and pass
    every other line it writes to stderr through."""
    fd = 2  # faiss writes to the process's standard error, whatever sys.stderr is
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.flush()
    try:
        saved = os.dup(fd)
    except OSError:  # no standard error at all: nothing to hide
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured if not _FAISS_FEW_POINTS.match(line)]
            if kept:
                os.write(fd, b"".join(kept))


class FaissQuantizer(Baseline):
    """Shared fit/encode/add/search/decode for the faiss quantizers (see module docstring)."""

    search_kind: ClassVar[str] = "asymmetric"

    def __init__(self, bits: int, seed: int = 0) -> None:
        super().__init__(bits, seed)
        if self.bits % CODEWORD_BITS:
            raise ValueError(
                f"{self.name} uses {CODEWORD_BITS}-bit codebooks, so bits must be a multiple of "
                f"{CODEWORD_BITS}; got {self.bits}. Use 8, 16, 24 or 32."
            )
        self.num_codebooks = self.bits // CODEWORD_BITS
        self._index: faiss.Index | None = None

    def _build_index(self, dim: int) -> faiss.Index:
        raise NotImplementedError

    def _input_dim(self, dim: int) -> int:
        """Dimension the faiss index sees (PQ pads); the identity by default."""
        return dim

    def _to_index_space(self, features: np.ndarray) -> np.ndarray:
        width = self._input_dim(features.shape[1])
        if width == features.shape[1]:
            return features
        padded = np.zeros((features.shape[0], width), dtype=np.float32)
        padded[:, : features.shape[1]] = features
        return padded

    def fit(self, features: np.ndarray, labels: np.ndarray | None = None) -> Self:
        """Train the codebooks on float (n, D) features (n >= 256); labels are ignored."""
        x = self._features(features, "training features", fitting=True)
        if x.shape[0] < CODEWORDS:
            raise ValueError(
                f"{self.name} learns {CODEWORDS} codewords per codebook, so it needs at least "
                f"{CODEWORDS} training rows; got {x.shape[0]}. Fit it on more features (e.g. "
                "--train-features, or a split with more training items) or leave it out."
            )
        index = self._build_index(x.shape[1])
        with faiss_training_output():
            index.train(self._to_index_space(x))
        self._index = index
        self.dim = x.shape[1]
        return self

    def _trained_index(self) -> faiss.Index:
        if self._index is None:
            raise ValueError(f"{self.name} is not fitted: call fit(train_features) first.")
        return self._index

    def encode(self, features: np.ndarray) -> np.ndarray:
        """uint8 (n, code_size) faiss codes of float (n, D) features."""
        x = self._features(features, "features")
        return self._trained_index().sa_encode(self._to_index_space(x))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """float32 (n, D) reconstructions of uint8 (n, code_size) codes."""
        index = self._trained_index()
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if codes.ndim != 2 or codes.shape[1] != index.sa_code_size():
            raise ValueError(
                f"codes must have shape (n, {index.sa_code_size()}) as returned by encode; "
                f"got {codes.shape}."
            )
        return index.sa_decode(codes)[:, : self.dim]

    def quantization_error(self, features: np.ndarray) -> float:
        """Mean squared Euclidean distance between float (n, D) features and their
        reconstructions."""
        x = self._features(features, "features")
        return float(((x - self.decode(self.encode(x))) ** 2).sum(axis=1).mean())

    def add(self, features: np.ndarray) -> None:
        """Encode float (n, D) database features and append them."""
        x = self._features(features, "database features")
        self._trained_index().add(self._to_index_space(x))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Asymmetric search: float32 (nq, k) squared distances to reconstructions, int64
        (nq, k) ids; ties by ascending id; inf / -1 beyond ntotal."""
        k = check_k(k)
        q = self._features(queries, "queries")
        distances, ids = self._trained_index().search(self._to_index_space(q), k)
        distances = distances.astype(np.float32, copy=False)
        distances[ids < 0] = np.inf
        return order_ties_by_id(distances, ids.astype(np.int64, copy=False))

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def code_size(self) -> int:
        return int(self._trained_index().sa_code_size())


class PQ(FaissQuantizer):
    """Product quantization: M = bits / 8 subspaces of 256 codewords."""

    name: ClassVar[str] = "pq"

    def _input_dim(self, dim: int) -> int:
        return -(-dim // self.num_codebooks) * self.num_codebooks

    def _build_index(self, dim: int) -> faiss.Index:
        index = faiss.IndexPQ(self._input_dim(dim), self.num_codebooks, CODEWORD_BITS)
        index.pq.cp.seed = self.seed
        return index


class OPQ(FaissQuantizer):
    """Optimized product quantization: learned rotation (D -> next multiple of M), then PQ."""

    name: ClassVar[str] = "opq"

    def __init__(self, bits: int, seed: int = 0, iterations: int = 50) -> None:
        super().__init__(bits, seed)
        if iterations < 1:
            raise ValueError(f"iterations must be at least 1; got {iterations}.")
        self.iterations = int(iterations)

    def _build_index(self, dim: int) -> faiss.Index:
        rotated_dim = -(-dim // self.num_codebooks) * self.num_codebooks
        rotation = faiss.OPQMatrix(dim, self.num_codebooks, rotated_dim)
        rotation.niter = self.iterations
        pq = faiss.IndexPQ(rotated_dim, self.num_codebooks, CODEWORD_BITS)
        pq.pq.cp.seed = self.seed
        return faiss.IndexPreTransform(rotation, pq)  # faiss keeps both parts referenced

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "iterations": self.iterations}


class RQ(FaissQuantizer):
    """Residual quantization: M stacked codebooks of 256 codewords over the full dimension,
    beam search of width ``beam_size`` when encoding (1 = greedy, the rule DPQ uses)."""

    name: ClassVar[str] = "rq"

    def __init__(self, bits: int, seed: int = 0, beam_size: int = 5) -> None:
        super().__init__(bits, seed)
        if beam_size < 1:
            raise ValueError(f"beam_size must be at least 1; got {beam_size}.")
        self.beam_size = int(beam_size)

    def _build_index(self, dim: int) -> faiss.Index:
        index = faiss.IndexResidualQuantizer(
            dim,
            self.num_codebooks,
            CODEWORD_BITS,
            faiss.METRIC_L2,
            faiss.AdditiveQuantizer.ST_norm_float,
        )
        index.rq.max_beam_size = self.beam_size
        index.rq.cp.seed = self.seed
        return index

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "beam_size": self.beam_size}


class LSQ(FaissQuantizer):
    """Local search quantization: M additive codebooks of 256 codewords, encoded by
    iterated local search (slow to train and encode: keep it small in tests)."""

    name: ClassVar[str] = "lsq"

    def __init__(
        self,
        bits: int,
        seed: int = 0,
        train_iterations: int = 25,
        encode_iterations: int = 16,
    ) -> None:
        super().__init__(bits, seed)
        if train_iterations < 1 or encode_iterations < 1:
            raise ValueError(
                "train_iterations and encode_iterations must be at least 1; got "
                f"{train_iterations} and {encode_iterations}."
            )
        self.train_iterations = int(train_iterations)
        self.encode_iterations = int(encode_iterations)

    def _build_index(self, dim: int) -> faiss.Index:
        index = faiss.IndexLocalSearchQuantizer(
            dim,
            self.num_codebooks,
            CODEWORD_BITS,
            faiss.METRIC_L2,
            faiss.AdditiveQuantizer.ST_norm_float,
        )
        index.lsq.random_seed = self.seed
        index.lsq.train_iters = self.train_iterations
        index.lsq.encode_ils_iters = self.encode_iterations
        return index

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "train_iterations": self.train_iterations,
            "encode_iterations": self.encode_iterations,
        }
