"""Binary hashing baselines with Hamming ranking: ITQ, ITQ-CCA (supervised) and LSH.

Each learns a linear map ``h(x) = (x - mean) @ projection`` to ``bits`` real values; the code
is their signs (bit = 1 where the value is >= 0), packed 8 bits per byte. Queries are
hashed the same way and the database is ranked by Hamming distance (symmetric, as these
methods are evaluated in the hashing literature); equal distances are ordered by database
id, the dpq tie rule.

- ``ITQ`` (Gong and Lazebnik, CVPR 2011): PCA to ``bits`` dimensions, then the orthogonal
  rotation minimising the quantization loss ||B - V R||_F, 50 alternating iterations.
- ``ITQCCA`` (Gong et al., TPAMI 2013): CCA between the features and the label matrix
  (one-hot or multi-hot) replaces PCA; each direction is scaled by its canonical
  correlation, as in the authors' code, then the ITQ rotation. With C classes only C - 1
  correlations are non-zero, so bits beyond that carry little. scikit-learn's ``CCA`` caps
  its components at the number of label columns, so the eigenproblem is solved here
  (numpy, with a small ridge on both covariances).
- ``LSH``: random Gaussian hyperplanes through the training mean (sign random projections).
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

import numpy as np

from dpq.evaluate.baselines.base import Baseline, check_k

# Elements of the (queries x database) distance block computed at once.
_BLOCK_ELEMENTS = 1 << 24


def pack_signs(values: np.ndarray) -> np.ndarray:
    """float (n, bits) -> uint8 (n, ceil(bits / 8)): bit = 1 where value >= 0 (big-endian
    within each byte, ``np.packbits`` order)."""
    return np.packbits(values >= 0, axis=1)


def hamming_distances(query_codes: np.ndarray, db_codes: np.ndarray) -> np.ndarray:
    """Hamming distances between packed binary codes.

    Args:
        query_codes: uint8 (nq, B) packed bits.
        db_codes: uint8 (N, B) packed bits, same B.

    Returns:
        uint16 (nq, N) numbers of differing bits.
    """
    if query_codes.ndim != 2 or db_codes.ndim != 2 or query_codes.shape[1] != db_codes.shape[1]:
        raise ValueError(
            "codes must be 2-D uint8 arrays with the same number of bytes per row; got shapes "
            f"{query_codes.shape} and {db_codes.shape}."
        )
    query_words, db_words = _as_words(query_codes), _as_words(db_codes)
    out = np.zeros((query_words.shape[0], db_words.shape[0]), dtype=np.uint16)
    for word in range(query_words.shape[1]):
        out += np.bitwise_count(query_words[:, word, None] ^ db_words[None, :, word])
    return out


def _as_words(codes: np.ndarray) -> np.ndarray:
    """uint8 (n, B) -> uint64 (n, ceil(B / 8)), zero-padded."""
    n_words = -(-codes.shape[1] // 8)
    padded = np.zeros((codes.shape[0], n_words * 8), dtype=np.uint8)
    padded[:, : codes.shape[1]] = codes
    return padded.view(np.uint64)


def itq_rotation(projected: np.ndarray, iterations: int, rng: np.random.Generator) -> np.ndarray:
    """ITQ: orthogonal (b, b) rotation R minimising ||sign(V R) - V R||_F for V = ``projected``
    float (n, b), by alternating the codes B and the orthogonal Procrustes solution for R."""
    bits = projected.shape[1]
    rotation, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
    for _ in range(iterations):
        codes = np.where(projected @ rotation >= 0, 1.0, -1.0)
        left, _, right_t = np.linalg.svd(codes.T @ projected)
        rotation = right_t.T @ left.T
    return rotation


class BinaryHash(Baseline):
    """Sign of a learned linear map, Hamming ranking (see module docstring)."""

    search_kind: ClassVar[str] = "hamming"

    def __init__(self, bits: int, seed: int = 0) -> None:
        super().__init__(bits, seed)
        self._mean: np.ndarray | None = None
        self._projection: np.ndarray | None = None
        self._db_codes = np.zeros((0, self.code_bytes), dtype=np.uint8)

    @property
    def code_bytes(self) -> int:
        return -(-self.bits // 8)

    def _set_map(self, mean: np.ndarray, projection: np.ndarray, dim: int) -> None:
        self._mean = mean.astype(np.float64)
        self._projection = projection.astype(np.float64)
        self.dim = dim
        self._db_codes = np.zeros((0, self.code_bytes), dtype=np.uint8)

    def project(self, features: np.ndarray) -> np.ndarray:
        """float64 (n, bits) real values whose signs are the code."""
        x = self._features(features, "features")
        return (x - self._mean) @ self._projection

    def encode(self, features: np.ndarray) -> np.ndarray:
        """uint8 (n, ceil(bits / 8)) packed sign bits of float (n, D) features."""
        return pack_signs(self.project(features))

    def add(self, features: np.ndarray) -> None:
        """Hash float (n, D) database features and append their codes."""
        self._db_codes = np.concatenate([self._db_codes, self.encode(features)])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Hamming ranking: float32 (nq, k) distances (numbers of differing bits), int64
        (nq, k) ids; equal distances by ascending id; inf / -1 beyond ntotal."""
        k = check_k(k)
        query_codes = self.encode(queries)
        nq, n_database = query_codes.shape[0], self._db_codes.shape[0]
        distances = np.full((nq, k), np.inf, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        kept = min(k, n_database)
        if kept == 0:
            return distances, ids
        step = max(1, _BLOCK_ELEMENTS // n_database)
        for start in range(0, nq, step):
            block = hamming_distances(query_codes[start : start + step], self._db_codes)
            # Stable sort of small integers (numpy uses radix sort): ties by ascending id.
            order = np.argsort(block, axis=1, kind="stable")[:, :kept]
            ids[start : start + step, :kept] = order
            distances[start : start + step, :kept] = np.take_along_axis(block, order, axis=1)
        return distances, ids

    @property
    def ntotal(self) -> int:
        return int(self._db_codes.shape[0])

    @property
    def code_size(self) -> int:
        return self.code_bytes


class LSH(BinaryHash):
    """Random Gaussian hyperplanes through the training mean."""

    name: ClassVar[str] = "lsh"

    def fit(self, features: np.ndarray, labels: np.ndarray | None = None) -> Self:
        """Store the mean of float (n, D) features and draw bits hyperplanes (labels unused)."""
        x = self._features(features, "training features", fitting=True)
        rng = np.random.default_rng(self.seed)
        self._set_map(x.mean(axis=0), rng.standard_normal((x.shape[1], self.bits)), x.shape[1])
        return self


class ITQ(BinaryHash):
    """PCA to bits dimensions + iterative quantization rotation."""

    name: ClassVar[str] = "itq"

    def __init__(self, bits: int, seed: int = 0, iterations: int = 50) -> None:
        super().__init__(bits, seed)
        self.iterations = int(iterations)

    def fit(self, features: np.ndarray, labels: np.ndarray | None = None) -> Self:
        """PCA + rotation from float (n, D) features (labels unused)."""
        x = self._features(features, "training features", fitting=True)
        _check_bits_fit(self, x)
        mean = x.mean(axis=0, dtype=np.float64)
        centered = x - mean
        eigenvalues, eigenvectors = np.linalg.eigh(centered.T @ centered)
        directions = eigenvectors[:, np.argsort(eigenvalues)[::-1][: self.bits]]  # PCA (D, bits)
        rotation = itq_rotation(
            centered @ directions, self.iterations, np.random.default_rng(self.seed)
        )
        self._set_map(mean, directions @ rotation, x.shape[1])
        return self

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "iterations": self.iterations}


class ITQCCA(BinaryHash):
    """Supervised ITQ: CCA directions (scaled by their correlations) + ITQ rotation."""

    name: ClassVar[str] = "itq-cca"
    supervised: ClassVar[bool] = True

    def __init__(
        self, bits: int, seed: int = 0, iterations: int = 50, regularization: float = 1e-4
    ) -> None:
        super().__init__(bits, seed)
        self.iterations = int(iterations)
        self.regularization = float(regularization)
        self.correlations: np.ndarray | None = None  # float64 (bits,) after fit

    def fit(self, features: np.ndarray, labels: np.ndarray | None = None) -> Self:
        """CCA between float (n, D) features and their labels (int (n,) or multi-hot (n, C)),
        then the ITQ rotation."""
        x = self._features(features, "training features", fitting=True)
        _check_bits_fit(self, x)
        targets = _label_matrix(labels, x.shape[0])
        mean = x.mean(axis=0, dtype=np.float64)
        centered = x - mean
        targets = targets - targets.mean(axis=0)
        n = x.shape[0]
        cov_xx = centered.T @ centered / n
        cov_yy = targets.T @ targets / n
        cov_xy = centered.T @ targets / n
        # Ridge relative to the average variance, so the scale of the features does not matter.
        cov_xx += (
            self.regularization
            * max(np.trace(cov_xx) / cov_xx.shape[0], 1e-12)
            * np.eye(cov_xx.shape[0])
        )
        cov_yy += (
            self.regularization
            * max(np.trace(cov_yy) / cov_yy.shape[0], 1e-12)
            * np.eye(cov_yy.shape[0])
        )
        # Cxx^-1 Cxy Cyy^-1 Cyx w = r^2 w, made symmetric with the Cholesky factor of Cxx.
        chol = np.linalg.cholesky(cov_xx)
        whitened_xy = np.linalg.solve(chol, cov_xy)
        symmetric = whitened_xy @ np.linalg.solve(cov_yy, whitened_xy.T)
        eigenvalues, eigenvectors = np.linalg.eigh(symmetric)
        top = np.argsort(eigenvalues)[::-1][: self.bits]
        correlations = np.sqrt(np.clip(eigenvalues[top], 0.0, None))
        directions = np.linalg.solve(chol.T, eigenvectors[:, top]) * correlations
        rotation = itq_rotation(
            centered @ directions, self.iterations, np.random.default_rng(self.seed)
        )
        self._set_map(mean, directions @ rotation, x.shape[1])
        self.correlations = correlations
        return self

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "iterations": self.iterations,
            "regularization": self.regularization,
        }


def _check_bits_fit(baseline: Baseline, x: np.ndarray) -> None:
    if baseline.bits > min(x.shape):
        raise ValueError(
            f"{baseline.name} projects to {baseline.bits} dimensions, which needs at least that "
            f"many feature dimensions and training rows; got features of shape {x.shape}."
        )


def _label_matrix(labels: Any, n: int) -> np.ndarray:
    """float64 (n, C) indicator matrix from int (n,) class ids or multi-hot (n, C)."""
    if labels is None:
        raise ValueError(
            "itq-cca is supervised: fit(features, labels) needs the training labels "
            "(int (n,) class ids or multi-hot (n, C))."
        )
    labels = np.asarray(labels)
    if labels.shape[0] != n:
        raise ValueError(
            f"got {labels.shape[0]} training labels for {n} training features; give one per row."
        )
    if labels.ndim == 1:
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"class ids must be integers; got dtype {labels.dtype}.")
        _, inverse = np.unique(labels, return_inverse=True)
        return np.eye(int(inverse.max()) + 1)[inverse]
    if labels.ndim == 2:
        return labels.astype(np.float64)
    raise ValueError(f"labels must be int (n,) or multi-hot (n, C); got shape {labels.shape}.")
