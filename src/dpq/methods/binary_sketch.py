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
each rank's share of the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dpq.config import DPQConfig
from dpq.devices import autocast
from dpq.methods.base import LossOutput, RetrievalMethod, Step, StepOutput
from dpq.model.retrieval_network import RetrievalNetwork

if TYPE_CHECKING:  # pragma: no cover
    from dpq.index.binary import BinaryIndex

DEFAULT_ALPHA = 0.01
OPTIONS = ("margin", "alpha")


def pair_similarity(targets: torch.Tensor) -> torch.Tensor:
    """float (B, B): 1 where two items share a label (same class id; a common label of
    multi-hot rows), else 0.

    Args:
        targets: int64 (B,) class ids or multi-hot (B, C).
    """
    if targets.ndim == 1:
        return (targets[:, None] == targets[None, :]).float()
    labels = targets.float()
    return (labels @ labels.t() > 0).float()


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
        similar = pair_similarity(targets)
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


class SignHashNetwork(RetrievalNetwork):
    """backbone -> Linear(F, bits) -> tanh; the searched features are the tanh outputs."""

    method_name = "sign"

    def __init__(self, config: DPQConfig) -> None:
        super().__init__(config)
        bits = config.method.bits
        if bits is None:
            raise ValueError("the sign method needs method.bits (a multiple of 8, e.g. 32).")
        self.hash_head = nn.Linear(int(self.backbone.out_features), bits)

    @property
    def feature_dim(self) -> int:
        return self.hash_head.out_features

    @property
    def logits_dim(self) -> int:
        return 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float32 (B, bits) outputs u = tanh(W f + b) of prepared inputs."""
        return torch.tanh(self.hash_head(self.backbone(x))).float()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    @torch.no_grad()
    def searched_features(
        self, x: torch.Tensor, tta_flip: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        features = self(x)
        flip = self.config.model.tta_flip if tta_flip is None else tta_flip
        if flip and self.input_kind == "images":
            features = 0.5 * (features + self(x.flip(3)))
        return features, features.new_zeros((len(features), 0))


class SignHashMethod(RetrievalMethod):
    """Sign codes of a tanh head trained with DSH's contrastive loss (module docstring)."""

    name = "sign"
    network_class = SignHashNetwork
    shown_losses = (("total", "loss"), ("pairs", "pairs"))

    def __init__(self, config: DPQConfig) -> None:
        super().__init__(config)
        method = config.method
        if method.bits is None or method.bits % 8:
            raise ValueError(
                f"the sign method needs method.bits, a multiple of 8 (e.g. 32); got {method.bits}."
            )
        unknown = sorted(set(method.options) - set(OPTIONS))
        if unknown:
            raise ValueError(
                f"method.options {unknown} are not settings of the sign method; it knows "
                f"{list(OPTIONS)}."
            )
        self.bits = method.bits
        self.margin = float(method.options.get("margin", 2.0 * method.bits))
        self.alpha = float(method.options.get("alpha", DEFAULT_ALPHA))
        if not (self.margin > 0 and self.alpha >= 0):
            raise ValueError(
                "method.options margin must be > 0 and alpha >= 0; got "
                f"margin {self.margin} and alpha {self.alpha}."
            )
        if config.train.mixup_alpha > 0:
            raise ValueError(
                "the sign method's pairs need each item's own labels: set train.mixup_alpha to 0."
            )

    def build_loss(self, word_vectors: np.ndarray | None) -> ContrastiveHashLoss:
        """The loss (label word vectors are not used)."""
        return ContrastiveHashLoss(self.margin, self.alpha)

    def forward_loss(
        self,
        network: RetrievalNetwork,
        loss: nn.Module,
        x: torch.Tensor,
        targets: torch.Tensor,
        step: Step,
        precision: str,
    ) -> StepOutput:
        with autocast(network.device, precision):
            outputs = network(x)
        return StepOutput(loss(outputs, targets), None)

    def code_lengths(self) -> tuple[int, ...]:
        return (self.bits,)

    def _check_bits(self, bits: int | None) -> None:
        if bits is not None and bits != self.bits:
            raise ValueError(
                f"this sign model gives {self.bits}-bit codes only; got bits={bits} (train one "
                "model per code length)."
            )

    def encode(
        self, network: RetrievalNetwork, features: np.ndarray, bits: int | None = None
    ) -> np.ndarray:
        """uint8 (N, bits / 8): bit b of an item is 1 where u_b > 0 (``np.packbits`` order)."""
        self._check_bits(bits)
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.bits:
            raise ValueError(
                f"features must be float (N, {self.bits}); got shape {features.shape}."
            )
        return np.packbits(features > 0, axis=1)

    def new_index(
        self, network: RetrievalNetwork, metadata: Mapping[str, Any] | None = None
    ) -> BinaryIndex:
        from dpq.index.binary import BinaryIndex

        return BinaryIndex(self.bits, metadata)

    def load_index(self, path: str | Path) -> BinaryIndex:
        from dpq.index.binary import BinaryIndex

        return BinaryIndex.load(path)

    def search(
        self,
        index: BinaryIndex,  # type: ignore[override]
        queries: np.ndarray,
        k: int,
        bits: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Hamming search of the queries' sign codes."""
        return index.search(self.encode(None, queries, bits), k)  # type: ignore[arg-type]
