"""The DPQ network: backbone -> semantic head (Linear + tanh, D) -> progressive quantizer,
plus a classifier head (the paper's Fig. 2).

Callers give raw inputs: uint8 images (N, H, W, 3) (normalisation by the mean/std stored in
the config happens inside the model), or float32 features (N, F) for the "identity" backbone.
A checkpoint is a directory with ``model.safetensors`` and ``config.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpq.atomic import write_bytes_atomic
from dpq.backbones import create_backbone
from dpq.config import DPQConfig, config_differences
from dpq.quantizer import ProgressiveQuantizer, QuantizerOutput

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINT_FORMAT = "dpq-model"
CHECKPOINT_VERSION = 1


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


def image_statistics(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation on a 0..1 scale.

    Args:
        images: uint8 (N, H, W, 3).

    Returns:
        (mean, std), three floats each, for ``ModelConfig.image_mean`` / ``image_std``.
    """
    _check_images(images)
    pixels = images.reshape(-1, 3)
    step = max(1, pixels.shape[0] // 2_000_000)  # a few million pixels are plenty
    sample = pixels[::step].astype(np.float64) / 255.0
    std = np.maximum(sample.std(axis=0), 1e-3)
    return tuple(float(v) for v in sample.mean(axis=0)), tuple(float(v) for v in std)


def _check_images(images: object) -> None:
    if not isinstance(images, np.ndarray):
        raise ValueError(f"images must be a numpy array; got {type(images).__name__}.")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(
            f"images must be uint8 of shape (N, H, W, 3); got {images.dtype} {images.shape}. "
            f"Convert grayscale images to RGB and floats in 0..1 with (x * 255).astype(np.uint8)."
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


write_atomic = write_bytes_atomic  # kept name: used across the package


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save a flat dict of tensors as safetensors, atomically."""
    from safetensors.torch import save

    write_atomic(path, save({name: t.detach().cpu().contiguous() for name, t in tensors.items()}))


def _architecture(config: DPQConfig) -> dict[str, Any]:
    """The config sections that decide the weights' shapes and meaning."""
    data = config.to_dict()
    return {"model": data["model"], "quantizer": data["quantizer"]}


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
        if config.train.channels_last and self.input_kind == "images":
            self.backbone.to(memory_format=torch.channels_last)

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
            float32 (B, 3, H, W) normalised images (channels-last memory when configured),
            or the float32 features.
        """
        if self.input_kind != "images":
            return batch.float()
        x = batch.permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.image_mean) / self.image_std
        if self.config.train.channels_last:
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
            with torch.autocast("cpu", enabled=False):
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

    @contextlib.contextmanager
    def _inference(self, bf16: bool) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                yield
        finally:
            self.train(was_training)

    def _run_batches(
        self,
        inputs: np.ndarray,
        batch_size: int,
        tta_flip: bool | None,
        bf16: bool | None,
        progress: bool,
        want_logits: bool,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        self.check_inputs(inputs)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
        flip = self.config.model.tta_flip if tta_flip is None else tta_flip
        flip = flip and self.input_kind == "images"
        use_bf16 = bool(bf16)
        n = inputs.shape[0]
        features = np.empty((n, self.config.quantizer.dim), dtype=np.float32)
        logits = np.empty((n, self.config.model.num_classes), np.float32) if want_logits else None
        starts = range(0, n, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="features", unit="batch", leave=False)
        device = self.image_mean.device
        with self._inference(use_bf16):
            for start in starts:
                batch = torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch_size]))
                x = self.prepare_inputs(batch.to(device))
                out = self(x, quantize=False)
                feats, scores = out.features, out.logits.float()
                if flip:
                    mirrored = self(x.flip(3), quantize=False)
                    scores = 0.5 * (scores + mirrored.logits.float())
                    if self.config.model.feature == "class_posterior":
                        feats = self.class_posterior(scores)
                    else:
                        feats = 0.5 * (feats + mirrored.features)
                        if self.config.model.normalize_features:
                            feats = self._to_feature_norm(feats)
                stop = start + batch.shape[0]
                features[start:stop] = feats.float().cpu().numpy()
                if logits is not None:
                    logits[start:stop] = scores.cpu().numpy()
        return features, logits

    def extract_features(
        self,
        inputs: np.ndarray,
        batch_size: int = 256,
        tta_flip: bool | None = None,
        bf16: bool | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """The features that are quantized (semantic, or class posteriors; see
        ``model.feature``) of raw inputs, batched, in eval mode, without gradients.

        Args:
            inputs: uint8 (N, H, W, 3) images, or float (N, F) features for the identity
                backbone.
            batch_size: inputs per forward pass.
            tta_flip: average with the features of the mirrored image (default: the
                config's ``model.tta_flip``; ignored for feature inputs).
            bf16: bfloat16 autocast of the network (default off: float32 features, whatever
                precision the training used).
            progress: show a tqdm bar.

        Returns:
            float32 (N, D).
        """
        return self._run_batches(inputs, batch_size, tta_flip, bf16, progress, False)[0]

    def extract_features_and_logits(
        self,
        inputs: np.ndarray,
        batch_size: int = 256,
        tta_flip: bool | None = None,
        bf16: bool | None = None,
        progress: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`extract_features`, also returning the classifier logits.

        Returns:
            features float32 (N, D) and logits float32 (N, C).
        """
        features, logits = self._run_batches(inputs, batch_size, tta_flip, bf16, progress, True)
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
        codes = self.quantizer.encode(
            torch.from_numpy(features).to(self.image_mean.device), num_levels
        )
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

    def save_checkpoint(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into the directory ``path``.

        Each file is written atomically; ``config.json`` is written last and records the
        SHA-256 of the weights, so a half-written pair is detected when loading.

        Args:
            path: directory (created if missing).
            extra: JSON-ready bookkeeping stored under ``config.json["checkpoint"]``.

        Returns:
            The directory.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(path / WEIGHTS_FILE, dict(self.state_dict()))
        record = self.config.to_dict()
        record["checkpoint"] = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "weights_sha256": _sha256(path / WEIGHTS_FILE),
            **(extra or {}),
        }
        write_atomic(path / CONFIG_FILE, json.dumps(record, indent=2, sort_keys=True).encode())
        return path

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, config: DPQConfig | None = None, device: str = "cpu"
    ) -> DPQModel:
        """Load a model saved by :meth:`save_checkpoint`.

        Args:
            path: the checkpoint directory.
            config: the model you expect; when given, its model and quantizer sections must
                equal the checkpoint's (else ``ValueError`` listing the differences). The
                loaded model carries the checkpoint's config.
            device: torch device to load onto.

        Raises:
            FileNotFoundError: missing directory or files.
            ValueError: a corrupted, mismatched or foreign checkpoint.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {path} does not exist.")
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(
                    f"{path} is not a DPQ checkpoint: {name} is missing (expected "
                    f"{WEIGHTS_FILE} and {CONFIG_FILE})."
                )
        try:
            record = json.loads((path / CONFIG_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path / CONFIG_FILE} is not valid JSON: {exc}.") from exc
        if not isinstance(record, dict) or not isinstance(record.get("checkpoint"), dict):
            raise ValueError(f"{path / CONFIG_FILE} has no 'checkpoint' record; not a DPQ model.")
        meta = record.pop("checkpoint")
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"{path} holds format {meta.get('format')!r} version {meta.get('version')!r}; "
                f"this dpq reads {CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION}."
            )
        saved_config = DPQConfig.from_dict(record)
        if config is not None:
            diffs = config_differences(_architecture(saved_config), _architecture(config))
            if diffs:
                raise ValueError(
                    f"checkpoint {path} does not match the requested model (checkpoint vs "
                    "requested): "
                    + "; ".join(diffs)
                    + ". Load it without a config, or request the checkpoint's settings."
                )
        if _sha256(path / WEIGHTS_FILE) != meta.get("weights_sha256"):
            raise ValueError(
                f"{path / WEIGHTS_FILE} does not match the checksum in {CONFIG_FILE}; the "
                f"checkpoint is corrupted or was half-written. Use an earlier checkpoint."
            )
        from safetensors.torch import load_file

        state = load_file(str(path / WEIGHTS_FILE), device=device)
        model = cls(saved_config).to(device)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"weights in {path} do not fit the model of its config: {exc}"
            ) from exc
        model.eval()
        return model
