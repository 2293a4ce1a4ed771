"""What every retrieval network shares, whatever its method: a backbone reading raw inputs,
and the searched features of a collection, batch by batch.

:class:`RetrievalNetwork` owns the backbone (:mod:`dpq.model.backbones`), the input
normalisation (uint8 images (N, H, W, 3), normalised by the mean/std of the config inside
the network; or float32 features (N, F) for the "identity" backbone), frozen backbone
stages, channels-last memory, feature extraction over a collection (in memory or read on
demand by worker processes) and the checkpoint files (:mod:`dpq.model.files`). A method's
network (:class:`dpq.model.network.DPQModel`, the sign-hash sketch's network) adds its heads
and says what its searched features are (:meth:`RetrievalNetwork.searched_features`);
:class:`HeadNetwork` is the base of a network that searches its own output (no classifier).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpq.config import DPQConfig
from dpq.devices import autocast
from dpq.model.backbones import create_backbone
from dpq.model.files import check_architecture, load_weights, read_checkpoint_config, save_model
from dpq.model.imagenet import freeze_stages
from dpq.progress import progress_bar

STATISTICS_SAMPLE = 2000
"""Images read by :func:`image_statistics` from a collection that is not in memory."""

NetworkT = TypeVar("NetworkT", bound="RetrievalNetwork")


def image_statistics(images: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation on a 0..1 scale.

    Args:
        images: uint8 (N, H, W, 3), an array or an on-demand reader (of which an evenly
            spaced sample of :data:`STATISTICS_SAMPLE` images is read).

    Returns:
        (mean, std), three floats each, for ``ModelConfig.image_mean`` / ``image_std``.
    """
    check_images(images)
    if not isinstance(images, np.ndarray):
        count = min(len(images), STATISTICS_SAMPLE)
        images = np.asarray(images[np.linspace(0, len(images) - 1, count).astype(np.int64)])
    pixels = images.reshape(-1, 3)
    step = max(1, pixels.shape[0] // 2_000_000)  # a few million pixels are plenty
    sample = pixels[::step].astype(np.float64) / 255.0
    std = np.maximum(sample.std(axis=0), 1e-3)
    return tuple(float(v) for v in sample.mean(axis=0)), tuple(float(v) for v in std)


def check_images(images: object) -> None:
    """ValueError unless ``images`` is uint8 (N, H, W, 3): an array, or a reader with
    ``shape`` and ``dtype`` such as :class:`dpq.data.ImageFileReader`."""
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


class RetrievalNetwork(nn.Module, metaclass=ABCMeta):
    """A backbone with the input handling and feature extraction every method shares.

    Subclasses build their heads after calling ``super().__init__(config)`` and define
    :meth:`searched_features`, :meth:`forward_features`, :attr:`feature_dim` and
    :attr:`logits_dim`; :attr:`method_name` names the method whose checkpoints
    :meth:`from_checkpoint` accepts.

    Args:
        config: the full configuration (``model`` builds the backbone and normalisation).
    """

    method_name: ClassVar[str | None] = None

    def __init__(self, config: DPQConfig) -> None:
        super().__init__()
        if not isinstance(config, DPQConfig):
            raise ValueError(f"config must be a DPQConfig; got {type(config).__name__}.")
        self.config = config
        model_cfg = config.model
        self.backbone = create_backbone(model_cfg.backbone, **model_cfg.backbone_kwargs)
        mean = torch.tensor(model_cfg.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(model_cfg.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("image_mean", mean, persistent=False)
        self.register_buffer("image_std", std, persistent=False)
        # uint8 pixel p -> (p / 255 - mean) / std = p * (1 / (255 std)) - mean / std: one pass
        self.register_buffer("_pixel_scale", 1.0 / (std * 255.0), persistent=False)
        self.register_buffer("_pixel_bias", -mean / std, persistent=False)
        self.channels_last = False
        self.frozen: list[nn.Module] = []

    # ------------------------------------------------------------------ what a method defines

    @property
    @abstractmethod
    def feature_dim(self) -> int:
        """Width of the searched features."""

    @property
    @abstractmethod
    def logits_dim(self) -> int:
        """Width of the logits :meth:`searched_features` returns (0: no classifier)."""

    @abstractmethod
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The searched features of prepared inputs in the current mode (train or eval), one
        view, with gradients: float (B, :attr:`feature_dim`)."""

    @abstractmethod
    def searched_features(
        self, x: torch.Tensor, tta_flip: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The features that are searched and the logits of prepared inputs (eval mode,
        no gradients): float32 (B, :attr:`feature_dim`) and float32 (B, :attr:`logits_dim`);
        ``tta_flip`` (default ``model.tta_flip``, images only) averages over the mirror."""

    # ------------------------------------------------------------------ backbone settings

    def freeze_backbone_stages(self: NetworkT, count: int) -> NetworkT:
        """Stop training the first ``count`` stages of the backbone
        (:func:`dpq.model.imagenet.freeze_stages`); they stay in eval mode while the rest trains."""
        self.frozen = freeze_stages(self.backbone, count)
        return self

    def train(self: NetworkT, mode: bool = True) -> NetworkT:
        super().train(mode)
        for stage in self.frozen:
            stage.eval()
        return self

    def set_channels_last(self: NetworkT, enabled: bool) -> NetworkT:
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

    # ------------------------------------------------------------------ inputs

    def check_inputs(self, inputs: np.ndarray) -> None:
        """Raise ``ValueError`` unless ``inputs`` suit the backbone (see :attr:`input_kind`)."""
        if self.input_kind == "images":
            check_images(inputs)
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

    # ------------------------------------------------------------------ inference

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
        features = np.empty((n, self.feature_dim), dtype=np.float32)
        logits = np.empty((n, self.logits_dim), np.float32) if want_logits else None
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
        """The searched features of raw inputs, batched, in eval mode, without gradients.

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
        cls: type[NetworkT],
        path: str | Path,
        config: DPQConfig | None = None,
        device: str | torch.device = "cpu",
        channels_last: bool | None = None,
    ) -> NetworkT:
        """Load a model saved by :meth:`save_checkpoint` onto ``device``, in eval mode.

        Args:
            path: the checkpoint directory.
            config: the model you expect; when given, its model, quantizer and method
                sections must equal the checkpoint's (else ``ValueError`` listing the
                differences).
            device: where the weights go; a checkpoint saved on any device loads on any other.
            channels_last: channels-last convolutions (a speed setting: 1.3x the images per
                second of the CIFAR-10 recipe's network on this project's CPU); None: as the
                checkpoint was trained.

        Raises:
            FileNotFoundError: missing directory or files.
            ValueError: a corrupted, mismatched or foreign checkpoint, or one of another
                method than this class's (load any with :func:`dpq.methods.load_network`).
        """
        saved_config, meta = read_checkpoint_config(path)
        if config is not None:
            check_architecture(path, saved_config, config)
        if cls.method_name is not None and saved_config.method.name != cls.method_name:
            raise ValueError(
                f"{path} holds a {saved_config.method.name!r} model, not a {cls.method_name!r} "
                "one; load it with dpq.methods.load_network(path)."
            )
        model = load_weights(cls(saved_config), path, meta)
        model.set_channels_last(
            saved_config.train.channels_last if channels_last is None else channels_last
        )
        return model.to(device).eval()


class HeadNetwork(RetrievalNetwork):
    """A network without a classifier whose output is what it searches: :meth:`forward`
    maps prepared inputs to float32 (B, :attr:`feature_dim`) features; the searched features
    are those outputs in eval mode, averaged with the mirrored image's when
    ``model.tta_flip`` (images only). Subclasses build the head (:meth:`new_head`) and
    define :meth:`forward` and :attr:`feature_dim`."""

    HEAD_INIT_STD: ClassVar[float | None] = 0.01
    """Standard deviation of the head's initial weights (biases start at 0), as the deep
    hashing and quantization authors initialise their new last layer (DeepHash's fc8,
    HashNet's hash layer): small outputs at the start, so a squashing tanh does not begin
    saturated on backbone features that share a large common component. None: torch's
    default initialisation of ``nn.Linear``."""

    def new_head(self, width: int) -> nn.Linear:
        """Linear(F, width) on the backbone's F features, initialised as
        :attr:`HEAD_INIT_STD` says."""
        head = nn.Linear(int(self.backbone.out_features), width)
        if self.HEAD_INIT_STD is not None:
            nn.init.normal_(head.weight, std=self.HEAD_INIT_STD)
            nn.init.zeros_(head.bias)
        return head

    @property
    def logits_dim(self) -> int:
        """0: no classifier."""
        return 0

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
