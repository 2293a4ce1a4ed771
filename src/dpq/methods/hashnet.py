"""HashNet as a method: Deep Learning to Hash by Continuation (Cao, Long, Wang, Yu; ICCV 2017).

- Network: the backbone -> Linear(F, bits), z; training reads h = tanh(beta z) with beta
  raised over training (:func:`dpq.methods.hashing_losses.hashnet_beta` on the run's global
  step, which :class:`~dpq.methods.base.Step` carries), so h tends to sign(z).
- Loss (:func:`dpq.methods.hashing_losses.hashnet_loss`): the weighted pairwise likelihood
  with theta_ij = alpha <h_i, h_j>, similar and dissimilar pairs weighted to equal total
  weight (the batch's own |S_1|, |S_0|).
- Codes: sign(z) (the searched features are tanh(z): the same signs), searched by Hamming
  distance (:class:`~dpq.index.binary.BinaryIndex`).
- Options (``method.options``): ``alpha`` (default 10 / bits, the authors' sigmoid scale; the
  main loss setting a tuning varies, the loss having no second term to weigh), ``gamma``
  (0.005), ``power`` (0.5) and ``step_size`` (200) of the continuation, ``lr_scale`` (1).

Faithful: the weighted likelihood as the authors' ``pairwise_loss_updated``, their alpha and
their continuation schedule, counted in training iterations as they do; sign codes; Hamming
ranking.

Where we differ, and why:
- The network and recipe: the shared ``cifar10`` backbone, augmentation, optimizer, schedule,
  batch size and precision (the issue's one protocol), not a fine-tuned AlexNet / ResNet-50
  whose hash layer learns at 10x.
- Pairs: every ordered pair within one batch; the authors pair two independently drawn
  batches. Both are pairs of the current mini-batch data, ours without a second loader.
- beta: a run of the table (20 epochs of ~39 steps) ends near beta = 2, where the authors'
  10,000 iterations reach about 7; ``gamma`` and ``step_size`` move the schedule, and beta
  is a function of the global step, so a resumed run continues where it stopped.
- The paper's fine-grained weights c_ij for multi-label data are not used (as in the
  authors' code).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from dpq.devices import autocast
from dpq.methods.base import Step
from dpq.methods.hashing_losses import hashnet_beta, hashnet_loss
from dpq.methods.hashing_method import BatchLoss, BinaryHashMethod, HashingNetwork
from dpq.methods.per_length import Option

GAMMA = 0.005
POWER = 0.5
STEP_SIZE = 200
"""The authors' continuation constants (thuml/HashNet, pytorch/src/network.py)."""


class HashNetNetwork(HashingNetwork):
    """backbone -> Linear(F, bits) -> tanh; training squashes with tanh(beta z) instead."""

    method_name = "hashnet"


class HashNetMethod(BinaryHashMethod):
    """HashNet (module docstring)."""

    name = "hashnet"
    network_class = HashNetNetwork

    def option_table(self) -> dict[str, Option]:
        return {
            "alpha": Option(10.0 / float(self.config.method.bits or 1), strict=True),
            "gamma": Option(GAMMA),
            "power": Option(POWER),
            "step_size": Option(STEP_SIZE, minimum=1, integer=True),
        }

    def beta(self, step: int) -> float:
        """beta at a global training step (:func:`hashnet_beta` with this model's schedule)."""
        options = self.options
        return hashnet_beta(
            step, gamma=options["gamma"], power=options["power"], step_size=options["step_size"]
        )

    def training_outputs(
        self,
        network: HashingNetwork,
        x: torch.Tensor,
        step: Step,
        precision: str,
    ) -> torch.Tensor:
        """float32 (B, bits): h = tanh(beta z) at the step's beta."""
        with autocast(network.device, precision):
            z = network.hash_layer(x)
        return torch.tanh(self.beta(step.step) * z.float())

    def build_loss(self, word_vectors: np.ndarray | None) -> BatchLoss:
        """HashNet's weighted likelihood at this model's alpha (word vectors are not used)."""
        return BatchLoss(partial(hashnet_loss, alpha=self.options["alpha"]))
