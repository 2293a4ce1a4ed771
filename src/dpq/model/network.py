"""The DPQ network: backbone -> semantic head (Linear + tanh, D) -> progressive quantizer,
plus a classifier head (the paper's Fig. 2).

Callers give raw inputs: uint8 images (N, H, W, 3) (normalisation by the mean/std stored in
the config happens inside the model), or float32 features (N, F) for the "identity" backbone.
A checkpoint is a directory with ``model.safetensors`` and ``config.json``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpq.config import DPQConfig
from dpq.devices import autocast, full_precision
from dpq.model.backbones import create_backbone
from dpq.model.files import check_architecture, load_weights, read_checkpoint_config, save_model
from dpq.model.quantizer import ProgressiveQuantizer, QuantizerOutput
from dpq.progress import progress_bar


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


STATISTICS_SAMPLE = 2000
"""Images read by :func:`image_statistics` from a collection that is not in memory."""


def image_statistics(images: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation on a 0..1 scale.

    Args:
        images: uint8 (N, H, W, 3), an array or an on-demand reader (of which an evenly
            spaced sample of :data:`STATISTICS_SAMPLE` images is read).

    Returns:
        (mean, std), three floats each, for ``ModelConfig.image_mean`` / ``image_std``.
    """
    _check_images(images)
    if not isinstance(images, np.ndarray):
        count = min(len(images), STATISTICS_SAMPLE)
        images = np.asarray(images[np.linspace(0, len(images) - 1, count).astype(np.int64)])
    pixels = images.reshape(-1, 3)
    step = max(1, pixels.shape[0] // 2_000_000)  # a few million pixels are plenty
    sample = pixels[::step].astype(np.float64) / 255.0
    std = np.maximum(sample.std(axis=0), 1e-3)
    return tuple(float(v) for v in sample.mean(axis=0)), tuple(float(v) for v in std)


def _check_images(images: object) -> None:
    """uint8 (N, H, W, 3): an array, or a reader with ``shape`` and ``dtype`` such as
    :class:`dpq.data.ImageFileReader`."""
    if not all(hasattr(images, name) for name in ("shape", "dtype", "__getitem__", "__len__")):
        raise ValueError(
            f"images must be a numpy array or an image reader; got {type(images).__name__}."
        )
    shape = tuple(images.shape)  # type: ignore[attr-defined]
    if np.dtype(images.dtype) != np.uint8 or len(shape) != 4 or shape[3] != 3:  # type: ignore[attr-defined]
        raise ValueError(
            f"images must be uint8 of shape (N, H, W, 3); got {images.dtype} {images.shape}. "
            f"Convert grayscale images to RGB and floats in 0..1 with (x * 255).astype(np.uint8)."
        )


class DPQModel(nn.Module):
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

    def __init__(self, config: DPQConfig) -> None:
        super().__init__()
        if not isinstance(config, DPQConfig):
            raise ValueError(f"config must be a DPQConfig; got {type(config).__name__}.")
        self.config = config
        model_cfg = config.model
        self.backbone = create_backbone(model_cfg.backbone, **model_cfg.backbone_kwargs)
        in_features = int(self.backbone.out_features)
        dim = config.quantizer.dim
        self.semantic_head = nn.Linear(in_features, dim)
        classifier_in = dim if model_cfg.classifier_input == "semantic" else in_features
        self.classifier = nn.Linear(classifier_in, model_cfg.num_classes)
        self.quantizer = ProgressiveQuantizer.from_config(config.quantizer)
        mean = torch.tensor(model_cfg.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(model_cfg.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("image_mean", mean, persistent=False)
        self.register_buffer("image_std", std, persistent=False)
        # uint8 pixel p -> (p / 255 - mean) / std = p * (1 / (255 std)) - mean / std: one pass
        self.register_buffer("_pixel_scale", 1.0 / (std * 255.0), persistent=False)
        self.register_buffer("_pixel_bias", -mean / std, persistent=False)
        self.channels_last = False
        self.frozen: list[nn.Module] = []

    def freeze_backbone_stages(self, count: int) -> DPQModel:
        """Stop training the first ``count`` stages of the backbone
        (:func:`dpq.model.backbones.freeze_stages`); they stay in eval mode while the rest trains."""
        from dpq.model.backbones import freeze_stages

        self.frozen = freeze_stages(self.backbone, count)
        return self

    def train(self, mode: bool = True) -> DPQModel:
        super().train(mode)
        for stage in self.frozen:
            stage.eval()
        return self

    def set_channels_last(self, enabled: bool) -> DPQModel:
        """Channels-last memory for the convolutions and the prepared inputs (a speed
        setting of the machine that runs the model; not saved with the weights)."""
        self.channels_last = bool(enabled) and self.input_kind == "images"
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        return self

    @property
    def device(self) -> torch.device:
        """The device of the model's weights (inputs are moved there)."""
        return self.image_mean.device

    @property
    def input_kind(self) -> str:
        """ "images" (uint8 (N, H, W, 3) inputs) or "features" (float (N, F) inputs)."""
        return getattr(self.backbone, "input_kind", "images")

    @property
    def code_dtype(self) -> np.dtype:
        """uint8 when K <= 256, else uint16 (the shared codes contract)."""
        return np.dtype(np.uint8 if self.config.quantizer.codebook_size <= 256 else np.uint16)

    # ------------------------------------------------------------------ inputs

    def check_inputs(self, inputs: np.ndarray) -> None:
        """Raise ``ValueError`` unless ``inputs`` suit the backbone (see :attr:`input_kind`)."""
        if self.input_kind == "images":
            _check_images(inputs)
            return
        width = int(self.backbone.out_features)
        if (
            not isinstance(inputs, np.ndarray)
            or inputs.ndim != 2
            or inputs.shape[1] != width
            or not np.issubdtype(inputs.dtype, np.floating)
        ):
            got = (
                f"{inputs.dtype} {inputs.shape}" if isinstance(inputs, np.ndarray) else type(inputs)
            )
            raise ValueError(f"features must be a float array of shape (N, {width}); got {got}.")

    def prepare_inputs(self, batch: torch.Tensor) -> torch.Tensor:
        """Raw batch -> network input.

        Args:
            batch: uint8 (B, H, W, 3) images, or float (B, F) features.

        Returns:
            float32 (B, 3, S, S) normalised images, resized to ``model.image_size`` = S
            when that is set (bilinear, on the model's device; antialiased when shrinking),
            in channels-last memory when configured; or the float32 features.
        """
        if self.input_kind != "images":
            return batch.float()
        # (B, H, W, 3) memory seen as (B, 3, H, W) is channels-last: no layout copy here, and
        # one fused multiply-add (a third of the time of /255, -mean, /std on this CPU)
        x = torch.addcmul(self._pixel_bias, batch.permute(0, 3, 1, 2).float(), self._pixel_scale)
        side = self.config.model.image_size
        if side is not None and tuple(x.shape[2:]) != (side, side):
            # after the normalisation, which is affine per channel as the interpolation is
            shrink = min(x.shape[2], x.shape[3]) > side
            x = F.interpolate(
                x, size=(side, side), mode="bilinear", align_corners=False, antialias=shrink
            )
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

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

    def iter_searched_features(
        self,
        inputs: Any,
        batch_size: int = 256,
        tta_flip: bool | None = None,
        precision: str = "fp32",
        workers: int | None = None,
        progress: bool = False,
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """The searched features and logits of raw inputs, one batch at a time, in order.

        Inputs in memory are batched in this process; an on-demand reader (such as
        :class:`dpq.data.ImageFileReader`) is decoded by ``workers`` DataLoader processes
        (:class:`dpq.data.loading.BatchReader`), a few batches ahead, so memory does not
        grow with the number of items. Runs in eval mode under ``torch.inference_mode``.

        Yields:
            (start, features float32 (b, D), logits float32 (b, C)) for rows start..start+b.
        """
        from dpq.data.loading import BatchReader

        self.check_inputs(inputs)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
        bar = progress_bar(len(inputs), "features", "img", enabled=progress, leave=False)
        was_training = self.training
        self.eval()
        device = self.device
        try:
            with BatchReader(inputs, workers=workers, device=device) as reader:
                for start, batch in reader.sequential(batch_size):
                    with torch.inference_mode(), autocast(device, precision):
                        x = self.prepare_inputs(batch.to(device, non_blocking=True))
                        feats, scores = self.searched_features(x, tta_flip)
                        features = feats.float().cpu().numpy()
                        logits = scores.float().cpu().numpy()
                    bar.update(len(features))
                    yield start, features, logits
        finally:
            bar.close()
            self.train(was_training)

    def _run_batches(
        self,
        inputs: Any,
        batch_size: int,
        tta_flip: bool | None,
        precision: str,
        progress: bool,
        want_logits: bool,
        workers: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        self.check_inputs(inputs)
        n = len(inputs)
        features = np.empty((n, self.config.quantizer.dim), dtype=np.float32)
        logits = np.empty((n, self.config.model.num_classes), np.float32) if want_logits else None
        for start, feats, scores in self.iter_searched_features(
            inputs, batch_size, tta_flip, precision, workers, progress
        ):
            features[start : start + len(feats)] = feats
            if logits is not None:
                logits[start : start + len(scores)] = scores
        return features, logits

    def extract_features(
        self,
        inputs: np.ndarray,
        batch_size: int = 256,
        tta_flip: bool | None = None,
        precision: str = "fp32",
        progress: bool = False,
        workers: int | None = None,
    ) -> np.ndarray:
        """The features that are quantized (semantic, or class posteriors; see
        ``model.feature``) of raw inputs, batched, in eval mode, without gradients.

        Args:
            inputs: uint8 (N, H, W, 3) images (an array, or an on-demand reader such as
                :class:`dpq.data.ImageFileReader`, decoded by worker processes), or float
                (N, F) features for the identity backbone.
            batch_size: inputs per forward pass.
            tta_flip: average with the features of the mirrored image (default: the
                config's ``model.tta_flip``; ignored for feature inputs).
            precision: "fp32" (default: float32 features, whatever precision the training
                used), "bf16" or "fp16" autocast of the network.
            progress: show a tqdm bar.
            workers: decoding processes for an on-demand reader (default: one per core, up
                to 8; 0: this process); in-memory arrays are batched in this process.

        Returns:
            float32 (N, D).
        """
        return self._run_batches(inputs, batch_size, tta_flip, precision, progress, False, workers)[
            0
        ]

    def extract_features_and_logits(
        self,
        inputs: np.ndarray,
        batch_size: int = 256,
        tta_flip: bool | None = None,
        precision: str = "fp32",
        progress: bool = False,
        workers: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`extract_features`, also returning the classifier logits.

        Returns:
            features float32 (N, D) and logits float32 (N, C).
        """
        features, logits = self._run_batches(
            inputs, batch_size, tta_flip, precision, progress, True, workers
        )
        return features, cast(np.ndarray, logits)

    embed = extract_features

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

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(
        self,
        path: str | Path,
        extra: dict[str, Any] | None = None,
        config: DPQConfig | None = None,
    ) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into the directory ``path``
        (:func:`dpq.model.files.save_model`; ``config`` defaults to the model's)."""
        return save_model(self, path, config=config, extra=extra)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        config: DPQConfig | None = None,
        device: str | torch.device = "cpu",
        channels_last: bool | None = None,
    ) -> DPQModel:
        """Load a model saved by :meth:`save_checkpoint` onto ``device``, in eval mode.

        Args:
            path: the checkpoint directory.
            config: the model you expect; when given, its model and quantizer sections must
                equal the checkpoint's (else ``ValueError`` listing the differences).
            device: where the weights go; a checkpoint saved on any device loads on any other.
            channels_last: channels-last convolutions (a speed setting: 1.3x the images per
                second of the CIFAR-10 recipe's network on this project's CPU); None: as the
                checkpoint was trained.

        Raises:
            FileNotFoundError: missing directory or files.
            ValueError: a corrupted, mismatched or foreign checkpoint.
        """
        saved_config, meta = read_checkpoint_config(path)
        if config is not None:
            check_architecture(path, saved_config, config)
        model = load_weights(cls(saved_config), path, meta)
        model.set_channels_last(
            saved_config.train.channels_last if channels_last is None else channels_last
        )
        return model.to(device).eval()
