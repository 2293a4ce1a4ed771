"""A binary-hash method, "sign": a deliberately different plug-in beside DPQ.

backbone -> Linear(F, bits) -> tanh gives u in (-1, 1)^bits; the code is sign(u), packed
into uint8 (N, bits / 8) and searched by Hamming distance (:class:`dpq.index.binary.BinaryIndex`).
The loss is DSH's (Liu et al., CVPR 2016) on the real-valued outputs, over every pair of a
batch: for a pair (i, j) with s_ij = 1 when the items share a label (else 0) and
d_ij = ||u_i - u_j||^2,

    L = mean_{i<j} [ s_ij d_ij / 2 + (1 - s_ij) max(m - d_ij, 0) / 2 ]
        + alpha mean_i sum_b | |u_ib| - 1 |

with margin m = 2 bits (``method.options["margin"]``) and alpha = 0.01
(``method.options["alpha"]``). One phase, no codebooks, no classifier; one trained network
per code length (``method.bits``). Under DistributedDataParallel the pairs are those within
each rank's share of the batch. The network, codes, index and guards are those every hashing
method shares (:mod:`dpq.methods.hashing_method`); the full DSH method is :mod:`.dsh`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dpq.methods.base import LossOutput
from dpq.methods.hashing_losses import pair_similarity
from dpq.methods.hashing_method import BinaryHashMethod, HashingNetwork
from dpq.methods.per_length import Option

DEFAULT_ALPHA = 0.01


class ContrastiveHashLoss(nn.Module):
    """DSH's pairwise contrastive loss plus the |(|u| - 1)| regulariser (module docstring).

    Args:
        margin: m, the squared distance dissimilar pairs are pushed beyond.
        alpha: weight of the regulariser that pulls outputs towards +-1.
    """

    def __init__(self, margin: float, alpha: float) -> None:
        super().__init__()
        self.margin = float(margin)
        self.alpha = float(alpha)

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> LossOutput:
        """The loss of float (B, bits) outputs u with their labels (int64 (B,) or (B, C))."""
        u = outputs.float()
        n = u.shape[0]
        similar = pair_similarity(targets).to(u.device).float()
        squared = (u[:, None, :] - u[None, :, :]).pow(2).sum(dim=2)
        per_pair = 0.5 * similar * squared + 0.5 * (1 - similar) * torch.relu(self.margin - squared)
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=u.device), diagonal=1)
        pairs = per_pair[upper].mean() if n > 1 else u.new_zeros(())
        regulariser = (u.abs() - 1).abs().sum(dim=1).mean()
        total = pairs + self.alpha * regulariser
        parts = {
            "pairs": float(pairs.detach()),
            "regulariser": float(regulariser.detach()),
            "total": float(total.detach()),
        }
        return LossOutput(total, parts)


class SignHashNetwork(HashingNetwork):
    """backbone -> Linear(F, bits) -> tanh; the searched features are the tanh outputs. The
    hash layer keeps torch's default initialisation."""

    method_name = "sign"
    HEAD_INIT_STD = None


class SignHashMethod(BinaryHashMethod):
    """Sign codes of a tanh head trained with DSH's contrastive loss (module docstring)."""

    name = "sign"
    network_class = SignHashNetwork
    shown_losses = (("total", "loss"), ("pairs", "pairs"))

    def option_table(self) -> dict[str, Option]:
        return {
            "margin": Option(2.0 * (self.config.method.bits or 0), strict=True),
            "alpha": Option(DEFAULT_ALPHA),
        }

    @property
    def margin(self) -> float:
        """m, the squared distance dissimilar pairs are pushed beyond."""
        return self.options["margin"]

    @property
    def alpha(self) -> float:
        """Weight of the regulariser."""
        return self.options["alpha"]

    def build_loss(self, word_vectors: np.ndarray | None) -> ContrastiveHashLoss:
        """The loss (label word vectors are not used)."""
        return ContrastiveHashLoss(self.margin, self.alpha)
