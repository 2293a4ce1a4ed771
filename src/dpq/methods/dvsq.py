"""DVSQ as a method: Deep Visual-Semantic Quantization (Cao, Long, Wang, Liu; CVPR 2017), the
competitor closest to DPQ (DPQ's semantic loss L_S is DVSQ's adaptive margin loss).

- Network (:class:`DVSQNetwork`): the backbone -> Linear(F, D) -> tanh, D = ``quantizer.dim``
  (300: the label word vectors' width, as DPQ's); M = bits / 8 composite codebooks of K = 256
  full D-dimensional codewords (:mod:`.quantization_method`); and the label word vectors W
  (C, D) as a buffer, copied from the loss at every training step, because the codes are
  assigned in their metric and so must travel with the model.
- Loss (:class:`DVSQLoss`): the adaptive margin loss of the features against the word vectors
  (:func:`dpq.methods.losses.semantic_loss`, margins 1 - cos(w_i, w_j)) plus lambda times the
  inner-product quantization loss mean_i ||W (z_i - sum_m C_m[b_im])||^2
  (:func:`~dpq.methods.quantization_losses.inner_product_quantization_loss`): the error of the
  inner products with every word vector.
- Codes: ICM in the word-vector metric, argmin_b ||W (z - sum_m C_m[b_m])||^2
  (:func:`~dpq.methods.quantization_losses.icm_encode`, 3 sweeps as the authors' code), for the
  training batches and the database alike.
- Search: inner product of the query's features with each item's reconstruction
  (:class:`~dpq.index.DPQIndex` mode "ip", lookup tables <q, C_m>): the paper's asymmetric
  quantizer distance, and what the authors' evaluation ranks by.
- Options (``method.options``): ``quantization_weight`` lambda (default 1e-4, the authors'
  script; the main loss weight a tuning varies), ``warmup_epochs`` (1), ``lr_scale`` (1).

Faithful: the two losses and their weight, composite full-dimensional codebooks initialised as
the authors do (uniform, then k-means per block of dimensions once the quantization loss
starts), ICM codes in the word-vector metric, the asymmetric inner-product search.

Where we differ, and why:
- The network and recipe: the shared ``cifar10`` backbone, augmentation, optimizer, schedule,
  batch size and precision (the issue's one protocol), not a fine-tuned AlexNet whose new
  layer learns at 10x; one training run per code length, as the paper.
- Codebooks learn by Adam on the quantization loss in the word-vector metric (the paper's
  objective), with each batch's codes assigned as it arrives; the authors instead refresh
  every training item's codes and solve the codebooks in closed form (plain least squares)
  every two epochs, outside the network's steps.
- The quantization loss is off for the first ``warmup_epochs`` epochs (the authors: their
  first two epochs of a ~250-epoch run).
- The semantic loss sums the hinges of an example over (positive, negative) label pairs and
  divides by C, the authors' normalisation for single-label data (their code also counts
  positive-positive pairs of multi-label data; we count negatives only, as the paper).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpq.config import DPQConfig
from dpq.methods.losses import semantic_loss, word_vectors_tensor
from dpq.methods.per_length import Option
from dpq.methods.quantization_losses import icm_encode, inner_product_quantization_loss
from dpq.methods.quantization_method import CodebookLoss, CodebookMethod, QuantizationNetwork

DEFAULT_QUANTIZATION_WEIGHT = 1e-4
ICM_SWEEPS = 3
"""ICM sweeps after the greedy start (the authors' ``max_iter_update_b``)."""


class DVSQNetwork(QuantizationNetwork):
    """The DVSQ network, with the label word vectors as the buffer ``word_vectors``, float32
    (C, D): zeros until a training step sets them."""

    method_name = "dvsq"

    def __init__(self, config: DPQConfig) -> None:
        super().__init__(config)
        self.register_buffer(
            "word_vectors", torch.zeros(config.model.num_classes, self.feature_dim)
        )

    @torch.no_grad()
    def set_word_vectors(self, word_vectors: torch.Tensor) -> None:
        """Keep float (C, D) word vectors with the network (the metric of its codes)."""
        self.word_vectors.copy_(word_vectors)

    def code_metric(self) -> np.ndarray:
        """float32 (C, D) word vectors the codes are assigned in; ValueError when the
        network was never trained (they are still zeros)."""
        metric = self.word_vectors.detach().float().cpu().numpy()
        if not metric.any():
            raise ValueError(
                "this DVSQ network holds no label word vectors (it has not been trained); its "
                "codes are assigned in their metric, so train it first."
            )
        return metric


class DVSQLoss(CodebookLoss):
    """L = L_S / C + lambda Q (module docstring), for float32 (B, D) features with int64 (B,)
    class ids or float (B, C) label weights.

    Args:
        word_vectors: float (C, D) label word vectors.
        quantization_weight: lambda.
        num_classes: C.
        dim: D.
    """

    main_part = "semantic"

    def __init__(
        self, word_vectors: np.ndarray, quantization_weight: float, num_classes: int, dim: int
    ) -> None:
        super().__init__(quantization_weight)
        self.register_buffer("word_vectors", word_vectors_tensor(word_vectors, num_classes, dim))
        self.num_classes = num_classes

    def main_loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 1:
            positives = F.one_hot(targets.long(), self.num_classes).float()
        else:
            positives = targets.float()
        return semantic_loss(features, positives, self.word_vectors) / self.num_classes

    def quantization_loss(
        self, features: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor
    ) -> torch.Tensor:
        return inner_product_quantization_loss(features, codebooks, codes, self.word_vectors)


class DVSQMethod(CodebookMethod):
    """Deep Visual-Semantic Quantization (module docstring)."""

    name = "dvsq"
    network_class = DVSQNetwork
    search_mode = "ip"
    shown_losses = (("total", "loss"), ("semantic", "L_S"), ("quantization", "Q"))

    def codebook_options(self) -> dict[str, Option]:
        return {"quantization_weight": Option(DEFAULT_QUANTIZATION_WEIGHT)}

    @property
    def uses_word_vectors(self) -> bool:
        """The adaptive-margin loss embeds images beside the label word vectors."""
        return True

    def build_loss(self, word_vectors: np.ndarray | None) -> DVSQLoss:
        """DVSQ's loss; ValueError without word vectors (one row of D numbers per class)."""
        config = self.config
        if word_vectors is None:
            raise ValueError(
                "the dvsq method needs label word vectors (one row of quantizer.dim numbers "
                "per class); pass them, e.g. --word-vectors PATH or 'orthogonal'."
            )
        return DVSQLoss(
            word_vectors,
            self.options["quantization_weight"],
            config.model.num_classes,
            config.quantizer.dim,
        )

    def prepare_step(self, network: DVSQNetwork, loss: nn.Module) -> None:  # type: ignore[override]
        """The network keeps the loss's word vectors (the metric its codes are assigned in)."""
        if not isinstance(loss, DVSQLoss):
            raise TypeError(f"the DVSQ method needs its DVSQLoss; got {type(loss).__name__}.")
        network.set_word_vectors(loss.word_vectors)

    def assign(
        self,
        network: DVSQNetwork,  # type: ignore[override]
        features: np.ndarray | torch.Tensor,
    ) -> np.ndarray:
        """ICM codes in the word-vector metric, int64 (N, M)."""
        return icm_encode(
            features, network.codebook_array(), network.code_metric(), iterations=ICM_SWEEPS
        )
