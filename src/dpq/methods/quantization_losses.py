"""Losses and code assignment of the deep quantization competitors (DPQ paper, Table 1).

- DQN (Cao et al., AAAI 2016): :func:`dqn_cosine_loss` + :func:`product_quantization_loss`,
  codebooks from :func:`pq_codebooks_by_kmeans`, codes from :func:`pq_encode`.
- DVSQ (Cao et al., CVPR 2017): its adaptive-margin loss is DPQ's semantic loss
  (:func:`dpq.methods.losses.semantic_loss`); here its inner-product quantization loss
  :func:`inner_product_quantization_loss` and :func:`icm_encode`, the iterated conditional
  modes encoder of additive codebooks under a metric (the label word vectors for DVSQ).

Codebooks are float (M, K, D): M codebooks of K codewords each, every codeword a full
D-dimensional vector. Product quantization is the special case where codebook m is zero
outside its own block of dimensions; an item's code is int64 (M,), its reconstruction
sum_m C_m[b_m] (:func:`reconstruct`). Losses are torch; the encoders are numpy (a CPU
tensor is accepted) and return int64 codes.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from dpq.methods.hashing_losses import pair_similarity

# Rows encoded at once: bounds the (rows, M * K) float64 score table to about 32 MB at
# M * K = 1024.
_ENCODE_ROWS = 4096


def dqn_cosine_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DQN's pairwise cosine loss (Cao et al., AAAI 2016, Sec. 3), mean over pairs i != j.

    L = mean_{i != j} (s_ij - cos(z_i, z_j))^2 with s_ij = +1 for similar and -1 for
    dissimilar pairs: the paper's s_ij in {-1, +1}, which the reference TF code
    (thulab/DeepHash, dqn.py) also builds from its {0, 1} similarity. The paper sums over
    pairs; the reference code takes the mean over all B x B entries including the
    diagonal (whose terms are 0); this is the mean over the B (B - 1) ordered pairs.

    Args:
        features: float (B, D), the network outputs z.
        labels: int64 (B,) class ids or multi-hot (B, C).

    Returns:
        float scalar tensor.
    """
    if features.ndim != 2 or features.shape[0] < 2 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"features must be (B, D) with B >= 2 and one label per row; got "
            f"{tuple(features.shape)} and labels {tuple(labels.shape)}."
        )
    target = pair_similarity(labels).to(device=features.device, dtype=features.dtype) * 2 - 1
    unit = F.normalize(features, dim=1)
    cosine = unit @ unit.t()
    off = ~torch.eye(features.shape[0], dtype=torch.bool, device=features.device)
    return (target - cosine)[off].pow(2).mean()


def reconstruct(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """sum_m C_m[b_m] for each item.

    Args:
        codebooks: float (M, K, D).
        codes: int (B, M), entries in [0, K).

    Returns:
        float (B, D), differentiable in the codebooks.
    """
    _check_codes(codebooks.shape, codes)
    num_codebooks = codebooks.shape[0]
    index = torch.arange(num_codebooks, device=codebooks.device)
    return codebooks[index[None, :], codes.to(codebooks.device).long()].sum(dim=1)


def product_quantization_loss(
    features: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor
) -> torch.Tensor:
    """DQN's product quantization loss (Sec. 3): mean_i ||z_i - sum_m C_m[b_im]||^2.

    With block-structured codebooks (codebook m zero outside subspace m) this is the sum
    over subspaces of the paper's ||z_im - C_m h_im||^2; the mean over items (the paper sums)
    matches the reference code's reduce_mean of the per-item squared error.

    Args:
        features: float (B, D), z.
        codebooks: float (M, K, D).
        codes: int (B, M).

    Returns:
        float scalar tensor, differentiable in features and codebooks.
    """
    _check_features(features.shape, codebooks.shape, codes.shape[0])
    return (features - reconstruct(codebooks, codes)).pow(2).sum(dim=1).mean()


def inner_product_quantization_loss(
    features: torch.Tensor,
    codebooks: torch.Tensor,
    codes: torch.Tensor,
    word_vectors: torch.Tensor,
) -> torch.Tensor:
    """DVSQ's inner-product quantization loss (Cao et al., CVPR 2017, Sec. 3.2).

    Q = mean_i sum_c (<w_c, z_i> - <w_c, sum_m C_m[b_im]>)^2 = mean_i ||W (z_i - z_hat_i)||^2:
    the error of the inner products between an item and every label word vector w_c, the
    quantities DVSQ searches by. The mean over items (the paper sums) is the reference
    code's reduce_mean (thulab/DeepHash, dvsq.py).

    Args:
        features: float (B, D), z.
        codebooks: float (M, K, D).
        codes: int (B, M).
        word_vectors: float (C, D), W.

    Returns:
        float scalar tensor.
    """
    _check_features(features.shape, codebooks.shape, codes.shape[0])
    if word_vectors.ndim != 2 or word_vectors.shape[1] != features.shape[1]:
        raise ValueError(
            f"word_vectors must be (C, D) with D = {features.shape[1]}; got "
            f"{tuple(word_vectors.shape)}."
        )
    residual = features - reconstruct(codebooks, codes)
    return (residual @ word_vectors.to(residual.dtype).t()).pow(2).sum(dim=1).mean()


def pq_codebooks_by_kmeans(
    features: np.ndarray | torch.Tensor,
    num_subspaces: int,
    codebook_size: int,
    seed: int = 0,
    iterations: int = 25,
) -> np.ndarray:
    """Product-quantization codebooks: k-means (faiss) in each block of dimensions.

    The D dimensions are cut into ``num_subspaces`` contiguous blocks as
    ``np.array_split`` cuts them (sizes differ by at most one when M does not divide D; the
    reference code requires D divisible by M). Codebook m holds the k-means centroids of
    block m and zeros elsewhere, DQN's block-diagonal C (the reference code
    re-initialises C this way with MiniBatchKMeans every other epoch).

    Args:
        features: float (N, D), N >= codebook_size.
        num_subspaces: M, at most D.
        codebook_size: K.
        seed: k-means seed (block m uses seed + m).
        iterations: k-means iterations.

    Returns:
        float32 (M, K, D).
    """
    x = _as_array(features, "features")
    count, dim = x.shape
    if not 1 <= num_subspaces <= dim:
        raise ValueError(f"num_subspaces must lie in [1, D = {dim}]; got {num_subspaces}.")
    if not 1 <= codebook_size <= count:
        raise ValueError(
            f"codebook_size must lie in [1, N = {count}] (k-means needs at least one point "
            f"per centroid); got {codebook_size}."
        )
    x = np.ascontiguousarray(x, dtype=np.float32)
    codebooks = np.zeros((num_subspaces, codebook_size, dim), dtype=np.float32)
    blocks = np.array_split(np.arange(dim), num_subspaces)
    for m, block in enumerate(blocks):
        start, stop = int(block[0]), int(block[-1]) + 1
        kmeans = faiss.Kmeans(
            stop - start,
            codebook_size,
            niter=iterations,
            seed=seed + m,
            verbose=False,
            min_points_per_centroid=1,
        )
        kmeans.train(np.ascontiguousarray(x[:, start:stop]))
        codebooks[m, :, start:stop] = kmeans.centroids
    return codebooks


def pq_encode(
    features: np.ndarray | torch.Tensor, codebooks: np.ndarray | torch.Tensor
) -> np.ndarray:
    """Nearest codeword of each codebook, chosen independently: b_m = argmin_k ||x - C_m[k]||^2.

    For block-structured (product) codebooks this is the exact minimiser of
    ||x - sum_m C_m[b_m]||^2, each block on its own (DQN's code update). Computed in float64 as
    argmin_k (||C_m[k]||^2 - 2 <x, C_m[k]>); ties go to the lower index.

    Args:
        features: float (N, D).
        codebooks: float (M, K, D).

    Returns:
        int64 (N, M).
    """
    x, flat, num_codebooks, size = _encoder_inputs(features, codebooks, None)
    norms = np.einsum("ij,ij->i", flat, flat).reshape(num_codebooks, size)
    codes = np.empty((x.shape[0], num_codebooks), dtype=np.int64)
    for start in range(0, x.shape[0], _ENCODE_ROWS):
        inner = (x[start : start + _ENCODE_ROWS] @ flat.T).reshape(-1, num_codebooks, size)
        codes[start : start + _ENCODE_ROWS] = (norms[None] - 2 * inner).argmin(axis=2)
    return codes


def icm_encode(
    features: np.ndarray | torch.Tensor,
    codebooks: np.ndarray | torch.Tensor,
    metric: np.ndarray | torch.Tensor | None = None,
    iterations: int = 3,
) -> np.ndarray:
    """Codes for additive codebooks by iterated conditional modes (DQN / DVSQ optimization).

    Minimises E(b) = ||A (x - sum_m C_m[b_m])||^2 with A = ``metric`` (identity when None;
    DVSQ passes its (C, D) word-vector matrix). Start: greedy residual encoding
    (b_1 nearest to x, b_2 nearest to the residual, ...). Then ``iterations`` sweeps over
    m = 1..M, each setting b_m to its best value with the other codes fixed; a code changes
    only when that strictly lowers E, so E never increases (within float64 rounding).
    ICM reaches a coordinate-wise minimum, not always the global one. The reference code
    starts from zero codes and sweeps the codebooks in a random order; the greedy start and
    fixed order make this deterministic. All work is in float64 on lookup tables:
    <A x, A C_m[k]> once per item and <A C_l[j], A C_m[k]> once per call, so a sweep costs
    O(M^2 K) per item.

    Args:
        features: float (N, D).
        codebooks: float (M, K, D).
        metric: float (P, D) or None.
        iterations: ICM sweeps after the greedy start (0: greedy codes only).

    Returns:
        int64 (N, M).
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0; got {iterations}.")
    x, flat, num_codebooks, size = _encoder_inputs(features, codebooks, metric)
    norms = np.einsum("ij,ij->i", flat, flat).reshape(num_codebooks, size)
    cross = (flat @ flat.T).reshape(num_codebooks, size, num_codebooks, size)
    codes = np.empty((x.shape[0], num_codebooks), dtype=np.int64)
    for start in range(0, x.shape[0], _ENCODE_ROWS):
        inner = (x[start : start + _ENCODE_ROWS] @ flat.T).reshape(-1, num_codebooks, size)
        codes[start : start + _ENCODE_ROWS] = _icm_block(inner, norms, cross, iterations)
    return codes


def _icm_block(
    inner: np.ndarray, norms: np.ndarray, cross: np.ndarray, iterations: int
) -> np.ndarray:
    """ICM on one block of rows, from the tables of :func:`icm_encode`.

    With ``coupling[i, m, k] = sum_l <C_l[b_il], C_m[k]>`` over the codebooks l assigned so
    far, E(b) - ||x||^2 changes by ``norms[m, k] - 2 inner[i, m, k] + 2 (coupling[i, m, k] -
    <C_m[b_im], C_m[k]>)`` minus the same at the current k when b_im moves to k.
    """
    rows, num_codebooks, _ = inner.shape
    row = np.arange(rows)
    codes = np.zeros((rows, num_codebooks), dtype=np.int64)
    coupling = np.zeros_like(inner)
    for m in range(num_codebooks):  # greedy residual start
        best = (norms[m] - 2 * inner[:, m] + 2 * coupling[:, m]).argmin(axis=1)
        codes[:, m] = best
        coupling += cross[m, best]
    for _ in range(iterations):
        for m in range(num_codebooks):
            current = codes[:, m]
            others = coupling[:, m] - cross[m, current, m]
            score = norms[m] - 2 * inner[:, m] + 2 * others
            best = score.argmin(axis=1)
            better = score[row, best] < score[row, current]
            if not better.any():
                continue
            moved = row[better]
            coupling[moved] += cross[m, best[moved]] - cross[m, current[moved]]
            codes[moved, m] = best[moved]
    return codes


def _encoder_inputs(
    features: np.ndarray | torch.Tensor,
    codebooks: np.ndarray | torch.Tensor,
    metric: np.ndarray | torch.Tensor | None,
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """float64 features (N, P) and flattened codebooks (M * K, P), in the metric's space."""
    x = _as_array(features, "features").astype(np.float64)
    books = np.asarray(_as_numpy(codebooks), dtype=np.float64)
    _check_features(x.shape, books.shape, x.shape[0])
    num_codebooks, size, dim = books.shape
    flat = books.reshape(num_codebooks * size, dim)
    if metric is not None:
        a = np.asarray(_as_numpy(metric), dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != dim:
            raise ValueError(f"metric must be (P, D) with D = {dim}; got shape {a.shape}.")
        x, flat = x @ a.T, flat @ a.T
    return x, np.ascontiguousarray(flat), num_codebooks, size


def _as_numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _as_array(values: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    array = _as_numpy(values)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be a numeric (N, D) array; got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or inf.")
    return array


def _check_features(
    features_shape: tuple[int, ...], codebooks_shape: tuple[int, ...], code_rows: int
) -> None:
    if len(codebooks_shape) != 3:
        raise ValueError(f"codebooks must have shape (M, K, D); got {tuple(codebooks_shape)}.")
    if len(features_shape) != 2 or features_shape[1] != codebooks_shape[2]:
        raise ValueError(
            f"features must be (N, D) with the codebooks' D = {codebooks_shape[2]}; got "
            f"{tuple(features_shape)}."
        )
    if code_rows != features_shape[0]:
        raise ValueError(
            f"codes have {code_rows} rows but features have {features_shape[0]}; give one "
            "code per item."
        )


def _check_codes(codebooks_shape: tuple[int, ...], codes: torch.Tensor) -> None:
    if len(codebooks_shape) != 3:
        raise ValueError(f"codebooks must have shape (M, K, D); got {tuple(codebooks_shape)}.")
    num_codebooks, size, _ = codebooks_shape
    if codes.ndim != 2 or codes.shape[1] != num_codebooks:
        raise ValueError(
            f"codes must have shape (B, M = {num_codebooks}); got {tuple(codes.shape)}."
        )
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"codes must be integers; got dtype {codes.dtype}.")
    if codes.numel() and (codes.min() < 0 or codes.max() >= size):
        raise ValueError(f"codes must lie in [0, K = {size}); got values outside it.")
