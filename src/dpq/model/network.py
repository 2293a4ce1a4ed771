"""The DPQ network: backbone -> semantic head (Linear + tanh, D) -> progressive quantizer,
plus a classifier head (the paper's Fig. 2).

The backbone, the input handling, feature extraction over a collection and the checkpoint
files are :class:`~dpq.model.retrieval_network.RetrievalNetwork`'s (every method's network
shares them); :class:`DPQModel` adds the heads, the quantizer and the codes. How it trains
and what index holds its codes is :class:`dpq.methods.dpq.DPQMethod`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpq.config import DPQConfig
from dpq.devices import full_precision
from dpq.model.quantizer import ProgressiveQuantizer, QuantizerOutput
from dpq.model.retrieval_network import RetrievalNetwork


@dataclass(frozen=True)
class ModelOutput:
    """Result of :meth:`DPQModel.forward`.

    Attributes:
        backbone_features: float (B, F), backbone output.
        features: float32 (B, D), what is quantized: the semantic features (below) or, with
            ``model.feature="class_posterior"``, the class probabilities padded to D.
        logits: float (B, C), classifier output.
        quantized: the quantizer's output on ``quantizer_input``, or None when not asked for.
        quantizer_input: float32 (B, D) that the quantizer read (``features``, or a detached
            copy so that the quantization losses do not reach the network).
    """

    backbone_features: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor
    quantized: QuantizerOutput | None
    quantizer_input: torch.Tensor | None
    semantic: torch.Tensor
    """float32 (B, D), semantic features v = tanh(W f + b) (what L_S trains)."""


class DPQModel(RetrievalNetwork):
    """Backbone -> semantic head (Linear(F, D) + tanh) -> ProgressiveQuantizer, and a
    classifier Linear(D or F, C).

    The classifier reads the backbone features by default, as the paper's MLP reads fc7
    (``model.classifier_input="semantic"`` makes it read the quantized features instead).
    With ``model.normalize_features`` the tanh features are rescaled to norm sqrt(D). With
    ``model.feature="class_posterior"`` the quantizer reads the class probabilities instead
    (see :class:`dpq.config.ModelConfig`); the semantic head then only trains the backbone.

    Args:
        config: the full configuration (the model, quantizer sections build the network).
    """

    method_name = "dpq"

    def __init__(self, config: DPQConfig) -> None:
        super().__init__(config)
        model_cfg = config.model
        in_features = int(self.backbone.out_features)
        dim = config.quantizer.dim
        self.semantic_head = nn.Linear(in_features, dim)
        classifier_in = dim if model_cfg.classifier_input == "semantic" else in_features
        self.classifier = nn.Linear(classifier_in, model_cfg.num_classes)
        self.quantizer = ProgressiveQuantizer.from_config(config.quantizer)

    @property
    def feature_dim(self) -> int:
        """D, the width of the quantized features."""
        return self.config.quantizer.dim

    @property
    def logits_dim(self) -> int:
        """C, the classes of the classifier."""
        return self.config.model.num_classes

    @property
    def code_dtype(self) -> np.dtype:
        """uint8 when K <= 256, else uint16 (the shared codes contract)."""
        return np.dtype(np.uint8 if self.config.quantizer.codebook_size <= 256 else np.uint16)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        inputs: torch.Tensor,
        quantize: bool = True,
        detach_quantizer_input: bool = False,
    ) -> ModelOutput:
        """Run the network on prepared inputs (see :meth:`prepare_inputs`).

        Args:
            inputs: float32 (B, 3, H, W) normalised images or (B, F) features.
            quantize: run the quantizer (float32, outside any autocast).
            detach_quantizer_input: quantize ``features.detach()`` so the quantization
                losses train the codebooks only.
        """
        backbone_features = self.backbone(inputs)
        semantic = torch.tanh(self.semantic_head(backbone_features)).float()
        if self.config.model.normalize_features:
            semantic = self._to_feature_norm(semantic)
        classifier_in = (
            semantic if self.config.model.classifier_input == "semantic" else backbone_features
        )
        logits = self.classifier(classifier_in)
        features = semantic
        if self.config.model.feature == "class_posterior":
            features = self.class_posterior(logits)
        quantized = None
        quantizer_input = None
        if quantize:
            quantizer_input = features.detach() if detach_quantizer_input else features
            with full_precision(features.device):
                quantized = self.quantizer(quantizer_input)
        return ModelOutput(
            backbone_features, features, logits, quantized, quantizer_input, semantic
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``features`` of :meth:`forward` without the quantizer: float32 (B, D)."""
        return self(x, quantize=False).features

    def _to_feature_norm(self, features: torch.Tensor) -> torch.Tensor:
        """float (B, D) -> the same directions with norm sqrt(D)."""
        return F.normalize(features, dim=1) * math.sqrt(self.config.quantizer.dim)

    def class_posterior(self, logits: torch.Tensor) -> torch.Tensor:
        """float (B, C) logits -> float32 (B, D): sqrt(D) softmax(logits / T) (sigmoid for
        multi-label) in the first C coordinates, zeros in the other D - C.

        The factor sqrt(D) (the norm of normalised semantic features) changes no inner-product
        ranking; it keeps squared distances on the scale the soft assignment's temperature
        is set for (unscaled, the CIFAR-10 level-1 codebook collapsed to 11 used codewords).
        """
        scaled = logits.float() / self.config.model.posterior_temperature
        if self.config.model.multilabel:
            probabilities = torch.sigmoid(scaled)
        else:
            probabilities = torch.softmax(scaled, dim=1)
        dim = self.config.quantizer.dim
        return F.pad(probabilities * math.sqrt(dim), (0, dim - probabilities.shape[1]))

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def searched_features(
        self, x: torch.Tensor, tta_flip: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The features that are quantized and searched, and the logits, of prepared inputs.

        The one definition of the searched feature: ``features`` of :meth:`forward` (semantic
        features or class posteriors, see ``model.feature``), or with ``tta_flip`` (default
        ``model.tta_flip``; images only) the average over the image and its mirror: the
        logits are averaged (class posteriors are then those of the averaged logits) and the
        semantic features are averaged (and rescaled again when ``normalize_features``).

        Args:
            x: float32 (B, 3, H, W) prepared images or (B, F) features (:meth:`prepare_inputs`).

        Returns:
            features float32 (B, D) and logits float32 (B, C).
        """
        flip = self.config.model.tta_flip if tta_flip is None else tta_flip
        out = self(x, quantize=False)
        features, logits = out.features.float(), out.logits.float()
        if flip and self.input_kind == "images":
            mirrored = self(x.flip(3), quantize=False)
            logits = 0.5 * (logits + mirrored.logits.float())
            if self.config.model.feature == "class_posterior":
                features = self.class_posterior(logits)
            else:
                features = 0.5 * (features + mirrored.features.float())
                if self.config.model.normalize_features:
                    features = self._to_feature_norm(features)
        return features, logits

    def encode_features(self, features: np.ndarray, num_levels: int | None = None) -> np.ndarray:
        """Codes of features from :meth:`extract_features` (greedy residual hard assignment).

        Args:
            features: float (N, D).
            num_levels: l <= L (default L).

        Returns:
            (N, l) uint8 when K <= 256, else uint16.
        """
        features = np.asarray(features, dtype=np.float32)
        codes = self.quantizer.encode(torch.from_numpy(features).to(self.device), num_levels)
        return codes.cpu().numpy().astype(self.code_dtype)

    def encode(
        self, inputs: np.ndarray, num_levels: int | None = None, batch_size: int = 256
    ) -> np.ndarray:
        """Codes of raw inputs: :meth:`extract_features` then :meth:`encode_features`.

        Returns:
            (N, l) uint8 when K <= 256, else uint16.
        """
        return self.encode_features(self.extract_features(inputs, batch_size), num_levels)

    def codebooks(self) -> np.ndarray:
        """float32 (L, K, D) copy of the codebooks."""
        return self.quantizer.codebooks.detach().float().cpu().numpy().copy()
