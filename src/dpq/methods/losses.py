"""DPQ losses (paper Eq. 2-7, 9-10, 18-21, 24) as pure functions plus :class:`DPQLoss`.

- :func:`classification_loss`: L_C, softmax cross-entropy (optional label smoothing, soft
  targets for mixup) or sigmoid cross-entropy for multi-label data (Eq. 2-5).
- :func:`semantic_loss`: L_S, the adaptive-margin loss against label word vectors (Eq. 6-7,
  the reference code's "soft margin" form).
- :func:`quantization_losses`: l_quan, l_quanH, l_match (Eq. 9-10, 18-20).
- :class:`DPQLoss`: L = L_S + lambda L_C + tau E with E = l_quan + mu l_quanH + nu l_match,
  terms switched on and off by a :class:`~dpq.config.LossConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpq.config import LossConfig
from dpq.methods.base import LossOutput
from dpq.model.quantizer import QuantizerOutput


def classification_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    multilabel: bool = False,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """L_C (Eq. 2-5), averaged over the batch.

    Args:
        logits: float (N, C).
        targets: single-label: int64 (N,) class ids, or float (N, C) class probabilities
            (e.g. mixup); multi-label: multi-hot (N, C) (bool, uint8 or float).
        multilabel: sigmoid cross-entropy, averaged over the N * C entries (Eq. 4).
        label_smoothing: mixes the single-label target with the uniform distribution.

    Returns:
        float scalar tensor.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, C); got {tuple(logits.shape)}.")
    logits = logits.float()
    if multilabel:
        if targets.shape != logits.shape:
            raise ValueError(
                f"multi-label targets must have the logits' shape {tuple(logits.shape)}; "
                f"got {tuple(targets.shape)}."
            )
        return F.binary_cross_entropy_with_logits(logits, targets.float())
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets.long(), label_smoothing=label_smoothing)
    if targets.shape != logits.shape:
        raise ValueError(
            f"soft targets must have the logits' shape {tuple(logits.shape)}; "
            f"got {tuple(targets.shape)}."
        )
    probabilities = targets.float()
    if label_smoothing > 0:
        probabilities = probabilities * (1 - label_smoothing) + label_smoothing / logits.shape[1]
    return -(probabilities * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def adaptive_margins(word_vectors: torch.Tensor) -> torch.Tensor:
    """delta_ij = 1 - cos(z_i, z_j) between label word vectors (Eq. 7).

    Args:
        word_vectors: float (C, D).

    Returns:
        float (C, C), zero on the diagonal.
    """
    unit = F.normalize(word_vectors.float(), dim=1)
    return 1.0 - unit @ unit.t()


def semantic_loss(
    features: torch.Tensor,
    positives: torch.Tensor,
    word_vectors: torch.Tensor,
    margin: float | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """Adaptive-margin semantic loss L_S (Eq. 6-7, soft-margin form of the reference code).

    For example n with positive labels i and negative labels j:
    hinge_nij = max(0, delta_ij - cos(v_n, z_i) + cos(v_n, z_j)), delta_ij = 1 - cos(z_i, z_j)
    (or the fixed ``margin``). Each hinge has weight positives[n, i] (1 for one-hot or
    multi-hot labels, the mixup coefficients for mixed targets). The loss of an example is the
    weighted sum of its hinges over the (i, j) pairs (``reduction="sum"``, Eq. 6) or their
    weighted mean (``"mean"``, which divides by the number of negatives: 9x weaker on
    CIFAR-10); the result is the mean over examples. An example with no positive or no
    negative label contributes 0.

    Args:
        features: float (N, D), the semantic features v.
        positives: float (N, C), label weights: one-hot / multi-hot / mixup probabilities;
            zero entries are the negative labels.
        word_vectors: float (C, D), label embeddings z.
        margin: None for the adaptive margin, else a fixed margin for all pairs.
        reduction: "sum" (the paper's Eq. 6) or "mean" over an example's pairs.

    Returns:
        float scalar tensor.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean'; got {reduction!r}.")
    if features.ndim != 2 or word_vectors.ndim != 2 or features.shape[1] != word_vectors.shape[1]:
        raise ValueError(
            f"features (N, D) and word_vectors (C, D) must share D; got {tuple(features.shape)} "
            f"and {tuple(word_vectors.shape)}."
        )
    if positives.shape != (features.shape[0], word_vectors.shape[0]):
        raise ValueError(
            f"positives must have shape (N, C) = ({features.shape[0]}, {word_vectors.shape[0]}); "
            f"got {tuple(positives.shape)}."
        )
    word_vectors = word_vectors.float()
    cos = F.normalize(features.float(), dim=1) @ F.normalize(word_vectors, dim=1).t()  # (N, C)
    if margin is None:
        delta = adaptive_margins(word_vectors)
    else:
        delta = torch.full(
            (word_vectors.shape[0], word_vectors.shape[0]), float(margin), device=cos.device
        )
    positive_weight = positives.float()
    negative = (positive_weight == 0).float()
    hinge = torch.relu(delta[None] - cos[:, :, None] + cos[:, None, :])  # (N, C_pos, C_neg)
    pair_weight = positive_weight[:, :, None] * negative[:, None, :]
    per_example = (hinge * pair_weight).sum(dim=(1, 2))
    if reduction == "mean":
        per_example = per_example / pair_weight.sum(dim=(1, 2)).clamp_min(1e-12)
    return per_example.mean()


@dataclass(frozen=True)
class QuantizationLosses:
    """The three terms of E (Eq. 21), each a float scalar tensor averaged over the batch.

    Attributes:
        quan: l_quan = sum_l w_l ||x - sum_{i<=l} q_i||^2 (soft, Eq. 9-10).
        quan_hard: l_quanH = sum_l w_l ||x - sum_{i<=l} q_i^H||^2 (Eq. 18-19).
        match: l_match = sum_l w_l ||q_l - q_l^H||^2 (Eq. 20).
    """

    quan: torch.Tensor
    quan_hard: torch.Tensor
    match: torch.Tensor


def quantization_losses(
    features: torch.Tensor,
    soft: torch.Tensor,
    hard: torch.Tensor,
    level_weights: torch.Tensor | None = None,
) -> QuantizationLosses:
    """l_quan, l_quanH and l_match, summed over levels with weights w_l, mean over the batch.

    Args:
        features: float (N, D), x (what the quantizer read).
        soft: float (N, L, D), soft quantizations q_l.
        hard: float (N, L, D), hard codewords q_l^H.
        level_weights: float (L,) w_l (default all ones).

    Returns:
        :class:`QuantizationLosses`.
    """
    if soft.ndim != 3 or soft.shape != hard.shape or soft.shape[0::2] != features.shape:
        raise ValueError(
            f"soft and hard must have shape (N, L, D) matching features (N, D); got "
            f"{tuple(soft.shape)}, {tuple(hard.shape)} and {tuple(features.shape)}."
        )
    num_levels = soft.shape[1]
    if level_weights is None:
        weights = torch.ones(num_levels, device=soft.device)
    else:
        weights = torch.as_tensor(level_weights, dtype=torch.float32, device=soft.device)
        if weights.shape != (num_levels,):
            raise ValueError(
                f"level_weights must have shape ({num_levels},); got {tuple(weights.shape)}."
            )
    x = features.float()[:, None, :]
    soft_error = (x - soft.float().cumsum(dim=1)).pow(2).sum(dim=2)  # (N, L)
    hard_error = (x - hard.float().cumsum(dim=1)).pow(2).sum(dim=2)
    match_error = (soft.float() - hard.float()).pow(2).sum(dim=2)
    return QuantizationLosses(
        quan=(soft_error * weights).sum(dim=1).mean(),
        quan_hard=(hard_error * weights).sum(dim=1).mean(),
        match=(match_error * weights).sum(dim=1).mean(),
    )


def word_vectors_tensor(
    word_vectors: np.ndarray | torch.Tensor, num_classes: int, dim: int
) -> torch.Tensor:
    """Check label word vectors against the model and return them as float32 (C, D).

    Raises ``ValueError`` when the number of rows differs from the number of classes or the
    width differs from the semantic dimension D.
    """
    wv = torch.as_tensor(np.asarray(word_vectors, dtype=np.float32))
    if wv.ndim != 2:
        raise ValueError(f"word vectors must be a (C, D) matrix; got shape {tuple(wv.shape)}.")
    if wv.shape[0] != num_classes:
        raise ValueError(
            f"the word vectors have {wv.shape[0]} rows but the data has {num_classes} classes; "
            f"give one word vector per class, in the order of the dataset's classes."
        )
    if wv.shape[1] != dim:
        raise ValueError(
            f"the word vectors are {wv.shape[1]}-d but the semantic features are {dim}-d "
            f"(quantizer.dim); set the dim to {wv.shape[1]} or switch the semantic loss off."
        )
    if not torch.isfinite(wv).all():
        raise ValueError("the word vectors contain NaN or inf.")
    if (wv.norm(dim=1) == 0).any():
        raise ValueError("a word vector is all zeros; its cosine similarity is undefined.")
    return wv


class DPQLoss(nn.Module):
    """L = L_S + lambda L_C + tau E (Eq. 24), E = l_quan + mu l_quanH + nu l_match (Eq. 21).

    Args:
        config: which terms are on and their weights.
        word_vectors: float (C, D) label embeddings; required when ``config.use_semantic``.
        num_classes: C.
        num_levels: L (for the level weights).
        dim: D (checked against the word vectors).
        multilabel: sigmoid cross-entropy and multi-hot targets.
    """

    def __init__(
        self,
        config: LossConfig,
        word_vectors: np.ndarray | torch.Tensor | None,
        num_classes: int,
        num_levels: int,
        dim: int,
        multilabel: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.multilabel = multilabel
        if config.use_semantic:
            if word_vectors is None:
                raise ValueError(
                    "the semantic loss L_S needs label word vectors (one 300-d row per class); "
                    "pass them, or switch the semantic loss off (e.g. ablation 'E+LC')."
                )
            self.register_buffer(
                "word_vectors", word_vectors_tensor(word_vectors, num_classes, dim)
            )
        else:
            self.word_vectors = None
        weights = config.level_weights or (1.0,) * num_levels
        if len(weights) != num_levels:
            raise ValueError(
                f"loss.level_weights has {len(weights)} entries for {num_levels} levels."
            )
        self.register_buffer("level_weights", torch.tensor(weights, dtype=torch.float32))

    def positives(self, targets: torch.Tensor) -> torch.Tensor:
        """Targets -> float (N, C) positive-label weights (one-hot for class ids)."""
        if targets.ndim == 1:
            if targets.dtype.is_floating_point:
                raise ValueError("single-label targets must be integer class ids.")
            return F.one_hot(targets.long(), self.num_classes).float()
        return targets.float()

    def energy(
        self, x: torch.Tensor, quantized: QuantizerOutput
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """E = l_quan + mu l_quanH + nu l_match (Eq. 21) over the active terms.

        Args:
            x: float (N, D), what the quantizer read.
            quantized: the quantizer's output on ``x``.

        Returns:
            (E as a float scalar tensor, {"quan", "quan_hard", "match", "E"} of the active
            terms; each term unweighted, "E" the weighted sum).
        """
        cfg = self.config
        terms = quantization_losses(x, quantized.soft, quantized.hard, self.level_weights)
        energy = x.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        if cfg.use_soft:
            parts["quan"] = terms.quan
            energy = energy + terms.quan
        if cfg.use_hard:
            parts["quan_hard"] = terms.quan_hard
            energy = energy + cfg.mu * terms.quan_hard
        if cfg.use_match:
            parts["match"] = terms.match
            energy = energy + cfg.nu * terms.match
        parts["E"] = energy
        return energy, parts

    def forward(
        self,
        features: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        quantized: QuantizerOutput | None = None,
        quantizer_input: torch.Tensor | None = None,
    ) -> LossOutput:
        """Compute the active terms.

        Args:
            features: float (N, D) semantic features v.
            logits: float (N, C) classifier output.
            targets: int64 (N,) class ids, or float (N, C) probabilities / multi-hot labels.
            quantized: the quantizer's output, or None to skip E (e.g. before the
                quantization phase).
            quantizer_input: the (N, D) tensor the quantizer read (``features.detach()`` when
                E must not reach the network); default ``features``.

        Returns:
            :class:`LossOutput`.
        """
        cfg = self.config
        parts: dict[str, torch.Tensor] = {}
        total = features.new_zeros((), dtype=torch.float32)
        if cfg.use_semantic:
            parts["semantic"] = semantic_loss(
                features,
                self.positives(targets),
                self.word_vectors,
                cfg.semantic_margin,
                cfg.semantic_reduction,
            )
            total = total + parts["semantic"]
        if cfg.use_cls:
            parts["cls"] = classification_loss(
                logits, targets, self.multilabel, cfg.label_smoothing
            )
            total = total + cfg.lambda_cls * parts["cls"]
        if quantized is not None and cfg.uses_quantization:
            x = features if quantizer_input is None else quantizer_input
            energy, energy_parts = self.energy(x, quantized)
            parts.update(energy_parts)
            total = total + cfg.tau * energy
        values = {name: float(value.detach()) for name, value in parts.items()}
        values["total"] = float(total.detach())
        return LossOutput(total=total, parts=values)
