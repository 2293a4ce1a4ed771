"""CSQ as a method: Central Similarity Quantization (Yuan, Wang, Tay, Xie, Ji, Feng, Zhou,
Yan; CVPR 2020). Not in the DPQ paper's table: a strong, simple and newer method, so the table
is not only a 2019 picture.

- Network: the backbone -> Linear(F, bits) -> tanh, outputs u; and the hash centres, one
  {-1, +1} row per class (:func:`dpq.methods.hashing_losses.hadamard_centres`: rows of a
  Hadamard matrix and its negation when bits is a power of two, else Bernoulli(0.5) rows
  meeting the paper's distance check), drawn once from ``train.seed`` when the network is
  built and kept in it as a buffer: saved with the weights, never trained.
- Loss (:func:`dpq.methods.hashing_losses.csq_loss`): binary cross-entropy between (u + 1) / 2
  and each item's centre (:func:`~dpq.methods.hashing_losses.csq_centre_of`: its class's, or
  the bitwise majority of its labels' centres), plus lambda times the quantization term.
- Codes: sign(u), searched by Hamming distance (:class:`~dpq.index.binary.BinaryIndex`).
- Options (``method.options``): ``quantization_weight`` lambda (default 1e-4, the authors';
  the main loss weight a tuning varies), ``lr_scale`` (1).

Faithful: the centres and their generation, the central similarity loss, lambda, tanh
outputs, sign codes, Hamming ranking.

Where we differ, and why:
- The network and recipe: the shared ``cifar10`` backbone, augmentation, optimizer, schedule,
  batch size and precision (the issue's one protocol), not a fine-tuned ResNet / AlexNet.
- The quantization term is the authors' code's mean (|u| - 1)^2, not the paper's log cosh
  (see :func:`~dpq.methods.hashing_losses.csq_loss`); means replace sums.
"""

from __future__ import annotations

import numpy as np
import torch

from dpq.config import DPQConfig
from dpq.methods.hashing_losses import csq_centre_of, csq_loss, hadamard_centres
from dpq.methods.hashing_method import BatchLoss, BinaryHashMethod, HashingNetwork
from dpq.methods.per_length import Option

DEFAULT_QUANTIZATION_WEIGHT = 1e-4


class CSQNetwork(HashingNetwork):
    """backbone -> Linear(F, bits) -> tanh, with the hash centres as the buffer ``centres``,
    float32 (C, bits) in {-1, +1}."""

    method_name = "csq"

    def __init__(self, config: DPQConfig) -> None:
        super().__init__(config)
        centres = hadamard_centres(
            config.model.num_classes, self.feature_dim, seed=config.train.seed
        )
        self.register_buffer("centres", centres)


class CSQMethod(BinaryHashMethod):
    """Central Similarity Quantization (module docstring)."""

    name = "csq"
    network_class = CSQNetwork

    def option_table(self) -> dict[str, Option]:
        return {"quantization_weight": Option(DEFAULT_QUANTIZATION_WEIGHT)}

    def build_loss(self, word_vectors: np.ndarray | None) -> BatchLoss:
        """CSQ's loss at this model's lambda; it reads the centres of the network it trains
        (word vectors are not used)."""
        weight = self.options["quantization_weight"]
        seed = self.config.train.seed

        def central_loss(
            codes: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor
        ) -> torch.Tensor:
            return csq_loss(codes, csq_centre_of(labels, centres, seed=seed), weight)

        return BatchLoss(central_loss)

    def loss_extras(self, network: CSQNetwork) -> tuple[torch.Tensor]:  # type: ignore[override]
        """The network's own centres: the batch's loss is against them."""
        return (network.centres,)
