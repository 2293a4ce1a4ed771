"""Losses of the deep binary-hashing competitors (DPQ paper, Table 1), as pure functions.

Every loss takes a batch of real-valued network outputs (B, bits) and the batch's labels,
and scores all ordered pairs (i, j), i != j, of the batch. Labels are int64 (B,) class ids
or multi-hot (B, C) (float, bool or uint8); two items are *similar* when they share a class
or at least one label (:func:`pair_similarity`, the relevance rule of
:mod:`dpq.evaluate.metrics`). The codes of all these methods are ``sign(outputs)``.

- :func:`dsh_loss`: DSH (Liu et al., CVPR 2016), contrastive loss + L1 regulariser.
- :func:`dhn_loss`: DHN (Zhu et al., AAAI 2016), pairwise likelihood + log-cosh quantization.
- :func:`hashnet_loss`, :func:`hashnet_beta`: HashNet (Cao et al., ICCV 2017), weighted
  pairwise likelihood and the continuation schedule of tanh(beta z).
- :func:`hadamard_centres`, :func:`csq_centre_of`, :func:`csq_loss`: CSQ (Yuan et al.,
  CVPR 2020), hash centres and the central-similarity loss.

The paper sums over pairs (and items); here every sum is a mean, so a loss does not grow
with the batch size (this rescales the learning rate only). Each docstring names the
equation it implements and where it follows the authors' code instead of the paper text.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def pair_similarity(labels: torch.Tensor) -> torch.Tensor:
    """Which pairs of the batch are similar: same class, or at least one shared label.

    Args:
        labels: int (B,) class ids, or multi-hot (B, C) (float, bool or uint8).

    Returns:
        bool (B, B), symmetric; the diagonal is True for every item with a label.
    """
    if labels.ndim == 1:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(
                f"1-D labels must be integer class ids; got dtype {labels.dtype}. Pass int64 "
                "class ids, or a (B, C) multi-hot matrix for multi-label data."
            )
        return labels[:, None] == labels[None, :]
    if labels.ndim == 2:
        hot = labels.to(torch.float64)
        return (hot @ hot.t()) > 0
    raise ValueError(
        f"labels must be (B,) class ids or a (B, C) multi-hot matrix; got shape "
        f"{tuple(labels.shape)}."
    )


def _check_batch(outputs: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if outputs.ndim != 2:
        raise ValueError(f"{name} must have shape (B, bits); got {tuple(outputs.shape)}.")
    if outputs.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 items to form a pair; got {outputs.shape[0]}.")
    if labels.shape[0] != outputs.shape[0]:
        raise ValueError(
            f"labels have {labels.shape[0]} rows but {name} has {outputs.shape[0]}; give one "
            "label (row) per item."
        )


def _off_diagonal(size: int, device: torch.device) -> torch.Tensor:
    """bool (size, size), True where i != j."""
    return ~torch.eye(size, dtype=torch.bool, device=device)


def dsh_loss(
    outputs: torch.Tensor,
    labels: torch.Tensor,
    margin: float | None = None,
    alpha: float = 0.01,
) -> torch.Tensor:
    """DSH loss (Liu et al., CVPR 2016, Sec. 3, relaxed pair loss), mean over pairs i != j.

    For a pair with y = 0 (similar) or y = 1 (dissimilar), the relaxed loss:
    L_r = 1/2 (1 - y) ||b_i - b_j||^2 + 1/2 y max(m - ||b_i - b_j||^2, 0)
    + alpha (|| |b_i| - 1 ||_1 + || |b_j| - 1 ||_1).
    The paper sums L_r over the pairs, which it forms online from all pairs of a mini-batch;
    this is that sum divided by the number of ordered pairs B (B - 1). The regulariser then
    equals 2 alpha times the per-item mean of || |b_i| - 1 ||_1. The paper's settings
    (its experiments section) are the defaults: m = 2 bits, alpha = 0.01.

    Args:
        outputs: float (B, bits), the real-valued outputs b (no tanh).
        labels: int64 (B,) class ids or multi-hot (B, C).
        margin: m; None for 2 * bits.
        alpha: weight of the regulariser.

    Returns:
        float scalar tensor.
    """
    _check_batch(outputs, labels, "outputs")
    batch, bits = outputs.shape
    m = 2.0 * bits if margin is None else float(margin)
    dissimilar = (~pair_similarity(labels).to(outputs.device)).to(outputs.dtype)
    distance = (outputs[:, None, :] - outputs[None, :, :]).pow(2).sum(dim=2)  # (B, B)
    contrastive = 0.5 * (1 - dissimilar) * distance + 0.5 * dissimilar * torch.relu(m - distance)
    off = _off_diagonal(batch, outputs.device)
    regulariser = (outputs.abs() - 1).abs().sum(dim=1).mean()
    return contrastive[off].mean() + 2.0 * alpha * regulariser


def _log_cosh(x: torch.Tensor) -> torch.Tensor:
    """log cosh(x) without overflow: |x| + log(1 + exp(-2|x|)) - log 2."""
    magnitude = x.abs()
    return magnitude + F.softplus(-2.0 * magnitude) - math.log(2.0)


def dhn_loss(
    outputs: torch.Tensor,
    labels: torch.Tensor,
    quantization_weight: float,
    alpha: float = 0.5,
) -> torch.Tensor:
    """DHN loss (Zhu et al., AAAI 2016, Sec. 3): pairwise likelihood + lambda quantization.

    With theta_ij = alpha <z_i, z_j> (alpha = 1/2 by default, the inner product's link to the
    Hamming distance, dist_H = 1/2 (bits - <h_i, h_j>)) and s_ij in {0, 1}, the negative log
    likelihood of a pair is log(1 + exp(theta_ij)) - s_ij theta_ij, computed as
    softplus(theta_ij) - s_ij theta_ij (no overflow). The quantization loss is the paper's
    smooth surrogate of || |z| - 1 ||_1, sum_k log cosh(|z_ik| - 1).

    Averaging (the paper sums): the likelihood is the mean over the ordered pairs i != j,
    the quantization term the mean over the B x bits entries (as the reference TF code's
    reduce_mean), so ``quantization_weight`` is on the reference code's scale. The
    reference code (thulab/DeepHash, dhn.py) departs from the paper in ways *not* followed
    here: it balances similar pairs by a weight |S| / |S_1|, squares (|z| - 1) instead of
    log cosh, clips the inner product to [-15, 15] and keeps the diagonal pairs.

    Args:
        outputs: float (B, bits), the network outputs z (after tanh in the paper).
        labels: int64 (B,) class ids or multi-hot (B, C).
        quantization_weight: lambda.
        alpha: scale of the inner product in theta.

    Returns:
        float scalar tensor.
    """
    _check_batch(outputs, labels, "outputs")
    similar = pair_similarity(labels).to(device=outputs.device, dtype=outputs.dtype)
    theta = alpha * (outputs @ outputs.t())
    likelihood = F.softplus(theta) - similar * theta
    off = _off_diagonal(outputs.shape[0], outputs.device)
    quantization = _log_cosh(outputs.abs() - 1).mean()
    return likelihood[off].mean() + quantization_weight * quantization


def hashnet_loss(
    codes: torch.Tensor, labels: torch.Tensor, alpha: float | None = None
) -> torch.Tensor:
    """HashNet's weighted maximum likelihood (Cao et al., ICCV 2017, Sec. 3.1).

    For the ordered pairs i != j with s_ij in {0, 1} and theta_ij = alpha <h_i, h_j>:
    L = 1/|S| sum_ij w_ij (log(1 + exp(theta_ij)) - s_ij theta_ij), with the paper's weights
    w_ij = |S| / |S_1| for similar and |S| / |S_0| for dissimilar pairs (c_ij = 1),
    i.e. the mean over similar pairs plus the mean over dissimilar pairs (a class of pairs
    the batch lacks contributes 0). Computed as softplus(theta) - s theta (no overflow).
    This is the authors' ``pairwise_loss_updated`` (thuml/HashNet, pytorch/src/loss.py),
    which uses the batch's own |S_1|, |S_0|; it ignores the paper's fine-grained c_ij for
    multi-label data, and so does this function. The default alpha = 10 / bits is the
    authors' ``sigmoid_param`` (train.py).

    Args:
        codes: float (B, bits), h = tanh(beta z) (see :func:`hashnet_beta`).
        labels: int64 (B,) class ids or multi-hot (B, C).
        alpha: sigmoid scale; None for 10 / bits.

    Returns:
        float scalar tensor.
    """
    _check_batch(codes, labels, "codes")
    batch, bits = codes.shape
    scale = 10.0 / bits if alpha is None else float(alpha)
    similar = pair_similarity(labels).to(codes.device)
    off = _off_diagonal(batch, codes.device)
    theta = scale * (codes @ codes.t())
    pair_loss = F.softplus(theta) - similar.to(codes.dtype) * theta
    total = codes.new_zeros(())
    for group in (similar & off, ~similar & off):
        if group.any():
            total = total + pair_loss[group].mean()
    return total


def hashnet_beta(
    step: int, gamma: float = 0.005, power: float = 0.5, step_size: int = 200
) -> float:
    """HashNet's continuation schedule for h = tanh(beta z) (Cao et al., ICCV 2017, Sec. 3.2).

    The paper raises beta during training so tanh(beta z) tends to sign(z); its constants
    come from the authors' code (thuml/HashNet, pytorch/src/network.py): beta is updated
    every ``step_size`` = 200 iterations to (1 + gamma * t)^power with gamma = 0.005,
    power = 0.5, t the iteration of the update. So beta = (1 + gamma * t0)^power with
    t0 = step rounded down to a multiple of ``step_size`` (``step_size=1``: every step).

    Args:
        step: training iteration, >= 0.
        gamma, power, step_size: the schedule's constants.

    Returns:
        beta >= 1.
    """
    if step < 0 or step_size < 1:
        raise ValueError(f"step must be >= 0 and step_size >= 1; got {step} and {step_size}.")
    last_update = (step // step_size) * step_size
    return float((1.0 + gamma * last_update) ** power)


def hadamard_centres(
    num_classes: int, bits: int, seed: int = 0, attempts: int = 20
) -> torch.Tensor:
    """CSQ hash centres (Yuan et al., CVPR 2020, Sec. 3.2, generation of hash centres).

    When ``bits`` is a power of two the centres are the rows of [H_bits; -H_bits] (Sylvester's
    Hadamard matrix), in that order: any two are at Hamming distance bits / 2 (or bits, for
    a row and its negation). Classes beyond 2 * bits, and all classes when ``bits`` is not a
    power of two (e.g. 24: Sylvester's construction has no H_24 and the paper uses Hadamard
    matrices only for powers of two), get random centres whose bits are drawn from
    Bernoulli(0.5), as the paper does. The random part is drawn up to ``attempts`` times
    (the authors' code draws 20) and the first draw meeting the paper's check, minimum
    pairwise Hamming distance above bits / 4 and mean at least bits / 2, is kept; if none
    does, the draw with the largest minimum (then mean) distance. Duplicate centres are
    always redrawn, so the centres are distinct.

    Args:
        num_classes: number of centres, at most 2 ** bits.
        bits: code length.
        seed: seed of the random centres.
        attempts: draws of the random centres.

    Returns:
        float32 (num_classes, bits), entries in {-1, +1}.
    """
    if num_classes < 1 or bits < 1:
        raise ValueError(f"num_classes and bits must be >= 1; got {num_classes} and {bits}.")
    if num_classes > 2**bits:
        raise ValueError(
            f"{num_classes} distinct centres do not fit in {bits} bits (at most {2**bits}); "
            "use more bits."
        )
    fixed = np.zeros((0, bits), dtype=np.int8)
    if bits & (bits - 1) == 0:
        hadamard = np.ones((1, 1), dtype=np.int8)
        while hadamard.shape[0] < bits:
            hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
        fixed = np.concatenate([hadamard, -hadamard])[:num_classes]
    missing = num_classes - fixed.shape[0]
    if missing == 0:
        return torch.from_numpy(fixed.astype(np.float32))
    rng = np.random.default_rng(seed)
    best, best_score = None, None
    for _ in range(max(1, attempts)):
        centres = _distinct_random_rows(fixed, missing, bits, rng)
        distances = _pairwise_hamming(centres)
        score = (int(distances.min()), float(distances.mean()))
        if best_score is None or score > best_score:
            best, best_score = centres, score
        if score[0] > bits / 4 and score[1] >= bits / 2:
            break
    return torch.from_numpy(best.astype(np.float32))


def _distinct_random_rows(
    fixed: np.ndarray, count: int, bits: int, rng: np.random.Generator
) -> np.ndarray:
    """``fixed`` followed by ``count`` Bernoulli(0.5) {-1, +1} rows, all rows distinct."""
    rows = [tuple(row) for row in fixed]
    seen = set(rows)
    while len(rows) < fixed.shape[0] + count:
        row = tuple(np.where(rng.random(bits) < 0.5, -1, 1).astype(np.int8))
        if row not in seen:
            seen.add(row)
            rows.append(row)
    return np.array(rows, dtype=np.int8)


def _pairwise_hamming(centres: np.ndarray) -> np.ndarray:
    """int (n (n - 1) / 2,) Hamming distances between the {-1, +1} rows, i < j."""
    bits = centres.shape[1]
    inner = centres.astype(np.int64) @ centres.astype(np.int64).T
    upper = np.triu_indices(centres.shape[0], k=1)
    return (bits - inner[upper]) // 2


def csq_centre_of(labels: torch.Tensor, centres: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The hash centre each item is pulled to (CSQ, Sec. 3.2, multi-label centroids).

    Single-label: its class's centre. Multi-label: the paper's centroid of its labels'
    centres, binarised bit by bit, i.e. the sign of the sum (a majority vote); a bit that
    ties (sum 0, also every bit of an item without labels) takes the bit of one fixed
    random {-1, +1} vector drawn from ``seed``, as the authors' code does.

    Args:
        labels: int64 (B,) class ids or multi-hot (B, C).
        centres: float (C, bits) in {-1, +1}, e.g. :func:`hadamard_centres`.
        seed: seed of the tie-breaking vector.

    Returns:
        float (B, bits) in {-1, +1}, on the centres' device and dtype.
    """
    if centres.ndim != 2:
        raise ValueError(f"centres must have shape (C, bits); got {tuple(centres.shape)}.")
    num_classes, bits = centres.shape
    if labels.ndim == 1:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"1-D labels must be integer class ids; got dtype {labels.dtype}.")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"class ids must lie in [0, {num_classes}) for {num_classes} centres.")
        return centres[labels.to(centres.device).long()]
    if labels.ndim != 2 or labels.shape[1] != num_classes:
        raise ValueError(
            f"multi-hot labels must have shape (B, {num_classes}) for {num_classes} centres; "
            f"got {tuple(labels.shape)}."
        )
    votes = labels.to(device=centres.device, dtype=centres.dtype) @ centres
    rng = np.random.default_rng(seed)
    tie = torch.from_numpy(np.where(rng.random(bits) < 0.5, -1.0, 1.0))
    tie = tie.to(device=centres.device, dtype=centres.dtype).expand_as(votes)
    return torch.where(votes == 0, tie, torch.sign(votes))


def csq_loss(
    codes: torch.Tensor, centres: torch.Tensor, quantization_weight: float
) -> torch.Tensor:
    """CSQ loss (Yuan et al., CVPR 2020, Sec. 3.3): central similarity + lambda quantization.

    L_C is the binary cross-entropy between h = (u + 1) / 2 and c = (centre + 1) / 2, averaged
    over the B x bits entries (the paper's L_C averages over bits; the mean over items replaces the
    sum). The quantization term follows the authors' code (yuanli2333/Hadamard-Matrix-for-
    hashing): the mean of (|u| - 1)^2; the paper writes the smooth log cosh(|2h - 1| - 1)
    instead. Log terms are clamped at -100 (torch's BCE), so u = +-1 stays finite.

    Args:
        codes: float (B, bits), u = tanh(z).
        centres: float (B, bits) in {-1, +1}, each item's centre (:func:`csq_centre_of`).
        quantization_weight: lambda (the authors use 1e-4).

    Returns:
        float scalar tensor.
    """
    if codes.ndim != 2 or centres.shape != codes.shape:
        raise ValueError(
            f"codes (B, bits) and their centres must have the same shape; got "
            f"{tuple(codes.shape)} and {tuple(centres.shape)}."
        )
    probability = (codes + 1) / 2
    target = (centres.to(codes.dtype) + 1) / 2
    central = F.binary_cross_entropy(probability, target)
    quantization = (codes.abs() - 1).pow(2).mean()
    return central + quantization_weight * quantization
