"""Configuration of a DPQ model and its training, as frozen dataclasses that travel with a
checkpoint (``config.json``).

:class:`DPQConfig` groups five parts:

- :class:`ModelConfig`: backbone, classifier, input normalisation.
- :class:`QuantizerConfig`: the L progressive quantization blocks (L, K, D, soft and hard
  assignment rules). ``dim`` (D) is also the size of the semantic head.
- :class:`LossConfig`: which losses are on and their weights (Eq. 24: L_S + lambda L_C + tau E,
  Eq. 21: E = l_quan + mu l_quanH + nu l_match).
- :class:`TrainConfig`: optimisation, schedule, augmentation, time budget.
- :class:`MethodConfig`: which retrieval method (:mod:`dpq.methods`) the network, loss,
  codes and index are: "dpq" unless told otherwise.

Every field is validated when the object is built; a bad value raises ``ValueError`` with a
sentence naming the field, the allowed values and what was given. ``to_dict``/``from_dict``
round-trip through JSON; unknown keys are an error, missing keys take the defaults.

The named recipes and the ablations of the paper's Table 2 are in :mod:`dpq.recipes`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from dpq.field_checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_mapping,
    check_text,
    checked_numbers,
)

SIMILARITIES: tuple[str, ...] = ("euclidean", "cosine")
ASSIGNMENTS: tuple[str, ...] = ("euclidean", "cosine")
RESIDUALS: tuple[str, ...] = ("hard", "soft")
CODEBOOK_INITS: tuple[str, ...] = ("kmeans", "normal")
CLASSIFIER_INPUTS: tuple[str, ...] = ("semantic", "backbone")
FEATURES: tuple[str, ...] = ("semantic", "class_posterior")
SCHEDULES: tuple[str, ...] = ("end_to_end", "two_phase", "two_step")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
LR_SCHEDULES: tuple[str, ...] = ("onecycle", "cosine", "constant")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "auto")

# Codes are stored as uint16 at most (the shared codes contract), so K <= 2**16.
MAX_CODEBOOK_SIZE = 1 << 16


@dataclass(frozen=True)
class QuantizerConfig:
    """The L progressive quantization blocks (paper section 2.2).

    Attributes:
        num_levels: L, number of Q-blocks; an item's code has L entries.
        codebook_size: K, codewords per level; must be a power of two because each code entry
            is packed into log2(K) bits (a code is L * log2(K) bits long).
        dim: D, size of the semantic feature and of every codeword.
        temperature: soft assignment (Eq. 14) uses softmax(s(x, c) / temperature), i.e. the
            paper's gamma is 1 / temperature; smaller is closer to the hard assignment.
        similarity: s in the soft assignment: "euclidean" (negative squared distance) or
            "cosine" (the paper's Eq. 15).
        assignment: hard assignment rule used for codes: "euclidean" (argmin squared
            distance, Eq. 26, the shared default) or "cosine" (argmax cosine, reference code).
        residual: input of block l+1: "hard" (x_l minus the hard codeword, reference code)
            or "soft" (x_l minus the soft quantization, Eq. 16).
        init: codebook initialisation: "kmeans" (residual k-means on features when the
            quantization phase starts) or "normal" (N(0, 0.01^2), reference code).
    """

    num_levels: int = 4
    codebook_size: int = 256
    dim: int = 300
    temperature: float = 1.0
    similarity: str = "euclidean"
    assignment: str = "euclidean"
    residual: str = "hard"
    init: str = "kmeans"

    def __post_init__(self) -> None:
        owner = "quantizer"
        check_int(owner, "num_levels", self.num_levels, 1)
        check_int(owner, "codebook_size", self.codebook_size, 2)
        k = self.codebook_size
        if k & (k - 1) != 0 or k > MAX_CODEBOOK_SIZE:
            raise ValueError(
                f"quantizer.codebook_size must be a power of two between 2 and "
                f"{MAX_CODEBOOK_SIZE}, because each code entry is packed into log2(K) bits; "
                f"got {k}. Use e.g. 256 (8 bits per level)."
            )
        check_int(owner, "dim", self.dim, 1)
        check_float(owner, "temperature", self.temperature, 0.0, strict_minimum=True)
        check_choice(owner, "similarity", self.similarity, SIMILARITIES)
        check_choice(owner, "assignment", self.assignment, ASSIGNMENTS)
        check_choice(owner, "residual", self.residual, RESIDUALS)
        check_choice(owner, "init", self.init, CODEBOOK_INITS)

    @property
    def bits_per_level(self) -> int:
        """log2(K): bits of one code entry."""
        return self.codebook_size.bit_length() - 1


@dataclass(frozen=True)
class ModelConfig:
    """Network around the quantizer: backbone -> semantic head (tanh, D) -> classifier.

    Attributes:
        backbone: a name from :mod:`dpq.model.backbones` ("resnet9", "small_cnn", "identity",
            "torchvision:<name>", "timm:<name>").
        backbone_kwargs: keyword arguments of the backbone factory (e.g. {"width": 0.5}).
        num_classes: C, classes (or labels, multi-label) of the training data.
        multilabel: sigmoid cross-entropy and "shares a label" relevance when true.
        classifier_input: what the classifier (the paper's MLP, Eq. 3) reads: "backbone"
            (the backbone output, as in the paper where the MLP reads fc7; the default) or
            "semantic" (the D-d tanh features that are quantized). Measured on CIFAR-10
            (docs/RESULTS.md): "semantic" saturates the tanh features and ranks worse.
        image_mean: per-channel mean of the input images on a 0..1 scale, subtracted inside
            the model (so callers pass raw uint8 images).
        image_std: per-channel standard deviation on a 0..1 scale.
        tta_flip: when true, ``extract_features`` averages the features of each image and
            its horizontal mirror.
        normalize_features: rescale every semantic feature (after tanh) to the norm sqrt(D),
            so that the Euclidean distances of search rank like cosine similarities (which L_S
            optimises), and the length of a vector no longer matters. Off in the paper.
            Applies to ``feature="semantic"`` only.
        feature: what is quantized and searched. "semantic" (the paper): the D-d tanh
            features of the semantic head, searched by AQD (Euclidean). "class_posterior"
            (not in the paper): the classifier's class probabilities p = softmax(logits / T)
            (sigmoid for multi-label), times sqrt(D), in the first C of the D coordinates
            (zeros after), searched by inner product, so an item's score is p_q . p_x, the probability
            that query and item share their class when both posteriors are right
            (for multi-label: the expected number of shared labels). Needs D >= C and the
            classifier on the backbone. The semantic head and L_S still train the backbone.
        posterior_temperature: T of ``feature="class_posterior"``.
        image_size: the side of the square images the network reads; images of another
            size are resized (bilinear) inside the model, on its device, so a 32 px
            collection can stay in memory while an ImageNet network reads it at 227 px.
            None: the images as they come. Pretrained backbones get theirs from
            :func:`dpq.model.backbones.input_defaults` when a run starts.
    """

    backbone: str = "resnet9"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 10
    multilabel: bool = False
    classifier_input: str = "backbone"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    tta_flip: bool = False
    normalize_features: bool = False
    feature: str = "semantic"
    posterior_temperature: float = 1.0
    image_size: int | None = None

    def __post_init__(self) -> None:
        owner = "model"
        check_text(owner, "backbone", self.backbone)
        check_mapping(owner, "backbone_kwargs", self.backbone_kwargs, "keyword arguments")
        object.__setattr__(self, "backbone_kwargs", dict(self.backbone_kwargs))
        check_int(owner, "num_classes", self.num_classes, 2 if not self.multilabel else 1)
        check_bool(owner, "multilabel", self.multilabel)
        check_choice(owner, "classifier_input", self.classifier_input, CLASSIFIER_INPUTS)
        for name in ("image_mean", "image_std"):
            # on a 0..1 scale: a value above 1 is a 0..255 statistic given by mistake
            value, strict = getattr(self, name), name == "image_std"
            rgb = checked_numbers(
                owner, name, value, "three numbers (R, G, B)", 3, maximum=1.0, strict_minimum=strict
            )
            object.__setattr__(self, name, rgb)
        check_bool(owner, "tta_flip", self.tta_flip)
        check_bool(owner, "normalize_features", self.normalize_features)
        check_choice(owner, "feature", self.feature, FEATURES)
        check_float(
            owner, "posterior_temperature", self.posterior_temperature, 0.0, strict_minimum=True
        )
        if self.image_size is not None:
            check_int(owner, "image_size", self.image_size, 8)
        if self.feature == "class_posterior" and self.classifier_input == "semantic":
            raise ValueError(
                "model.feature 'class_posterior' quantizes the classifier's probabilities, so "
                "the classifier cannot also read the quantized features: set "
                "model.classifier_input to 'backbone'."
            )

    @property
    def search_mode(self) -> str:
        """How an index of this model's codes is searched: "aqd" (squared Euclidean,
        Eq. 30) for semantic features, "ip" (inner product) for class posteriors."""
        return "ip" if self.feature == "class_posterior" else "aqd"


@dataclass(frozen=True)
class LossConfig:
    """Loss terms and weights: L = L_S + lambda L_C + tau E (Eq. 24) with
    E = l_quan + mu l_quanH + nu l_match (Eq. 21).

    Attributes:
        lambda_cls: lambda, weight of the classification loss L_C.
        tau: weight of the quantization loss E. The paper uses 1; its E sums squared errors
            over the D dimensions, and with tau = 1 E then dominates and collapses the
            features in end-to-end training (digits, D = 64: mAP 0.10 at tau = 1 against 0.95
            at tau = 0.01), hence the default 0.01. Under the two-phase schedule E trains only
            the codebooks with Adam, which is insensitive to this scale.
        mu: weight of the hard-assignment loss l_quanH inside E.
        nu: weight of the soft/hard matching loss l_match inside E.
        level_weights: w_l for l = 1..L (Eq. 10, 19, 20); None means all ones.
        use_semantic: include the adaptive-margin loss L_S (needs label word vectors).
        use_cls: include the classification loss L_C.
        use_soft: include l_quan (soft assignments).
        use_hard: include l_quanH (hard assignments).
        use_match: include l_match.
        label_smoothing: label smoothing of the softmax cross-entropy (single-label only).
        semantic_margin: None for the adaptive margin delta_ij = 1 - cos(z_i, z_j) (Eq. 7,
            reference code's soft margin), or a fixed margin for every label pair.
        semantic_reduction: how an example's hinges over (positive, negative) label pairs
            combine: "sum" (Eq. 6) or "mean" (divides L_S by the number of pairs).
    """

    lambda_cls: float = 0.1
    tau: float = 0.01
    mu: float = 1.0
    nu: float = 0.1
    level_weights: tuple[float, ...] | None = None
    use_semantic: bool = True
    use_cls: bool = True
    use_soft: bool = True
    use_hard: bool = True
    use_match: bool = True
    label_smoothing: float = 0.0
    semantic_margin: float | None = None
    semantic_reduction: str = "sum"

    def __post_init__(self) -> None:
        owner = "loss"
        for name in ("lambda_cls", "tau", "mu", "nu"):
            check_float(owner, name, getattr(self, name))
        if self.level_weights is not None:
            what = "a list of L non-negative numbers or null"
            weights = checked_numbers(owner, "level_weights", self.level_weights, what)
            object.__setattr__(self, "level_weights", weights)
        for name in ("use_semantic", "use_cls", "use_soft", "use_hard", "use_match"):
            check_bool(owner, name, getattr(self, name))
        if not (
            self.use_semantic or self.use_cls or self.use_soft or self.use_hard or self.use_match
        ):
            raise ValueError(
                "loss: every loss term is switched off (use_semantic, use_cls, use_soft, "
                "use_hard, use_match are all false); switch at least one on."
            )
        check_float(owner, "label_smoothing", self.label_smoothing, 0.0, 1.0, strict_maximum=True)
        if self.semantic_margin is not None:
            check_float(owner, "semantic_margin", self.semantic_margin, 0.0, 2.0)
        check_choice(owner, "semantic_reduction", self.semantic_reduction, ("sum", "mean"))

    @property
    def uses_quantization(self) -> bool:
        """True when any term of E is on."""
        return self.use_soft or self.use_hard or self.use_match


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule and augmentation.

    Attributes:
        epochs: passes over the training set (ignored when ``time_budget_minutes`` is set:
            the trainer then measures the step speed and fixes the number of epochs that fit).
        time_budget_minutes: wall-clock budget of the training run, or None.
        batch_size: images per step.
        optimizer: "sgd" (Nesterov momentum), "adam" or "adamw" for the network.
        lr: peak learning rate of the network.
        momentum: SGD momentum.
        weight_decay: weight decay of the network's weights (not of biases/BatchNorm).
        lr_schedule: "onecycle" (linear warm-up then linear decay to 0), "cosine" (linear
            warm-up then cosine decay to 0) or "constant".
        warmup_fraction: fraction of all steps spent warming up.
        schedule: "two_phase" (the default; reference code: the first part trains with
            L_S + lambda L_C only; afterwards E trains the codebooks on detached features
            while the network keeps training with L_S + lambda L_C), "end_to_end" (E
            back-propagates into the network, as the paper says) or "two_step" (features
            first, then the network is frozen and only the codebooks are trained, Table 2's
            Two-Step). Two-phase is the default because it measured better on CIFAR-10
            (docs/RESULTS.md: same 6-minute budget, 0.331 vs 0.318 mAP@54000 at 32 bits; end
            to end with tau = 0.01 took a 30-minute run's training accuracy from 0.81 to 0.21).
        quantization_start: fraction of the epochs after which the quantization losses start
            (and the codebooks are initialised by k-means when ``quantizer.init`` is
            "kmeans"); 0 starts them at once.
        codebook_lr: Adam learning rate of the codebooks (reference code: 1e-4).
        crop_pad: random crop after reflect-padding by this many pixels (0: off).
        flip: random horizontal flips.
        cutout: side of a square set to the mean colour at a random place (0: off).
        mixup_alpha: mixup Beta(alpha, alpha) on images and targets (0: off).
        randaugment_ops: RandAugment operations per training image (0: off), applied after
            crop and flip (:func:`dpq.training.augment.rand_augment`).
        randaugment_magnitude: strength of those operations, 0..30 (torchvision's scale).
        precision: the network's arithmetic during training: "fp32", "bf16" (bfloat16
            autocast), "fp16" (float16 autocast with a gradient scaler, GPUs) or "auto",
            decided when training starts on the machine that trains (bf16 on a GPU or CPU
            with native bf16, fp16 on a GPU without it, else fp32; see
            :func:`dpq.devices.resolve_precision`). The quantizer and the losses always run
            in float32. (Older configs' ``bf16: true/false`` read as "bf16"/"fp32".)
        channels_last: channels-last memory format for convolutions.
        ema_decay: exponential moving average of the weights, used for the final model
            (0: off; e.g. 0.999).
        grad_clip: clip the gradient norm of the network to this value (0: off).
        seed: seed of initialisation, shuffling and augmentation.
        kmeans_iterations: Lloyd iterations per level of the k-means initialisation.
        final_kmeans: re-fit the codebooks by residual k-means on the final training
            features after training (a post-hoc option to measure, off by default).
        num_threads: torch threads (0: the cores available to the process, capped by
            OMP_NUM_THREADS when set).
        keep_checkpoints: epoch checkpoints kept on disk (the newest ones).
        backbone_weights: a local file of pretrained backbone weights (safetensors, or a
            state dict saved by ``torch.save``), loaded before training starts
            (:func:`dpq.model.imagenet.load_backbone_weights`; never downloaded). None: the
            backbone starts from its random initialisation.
        backbone_lr_scale: the backbone learns at ``lr * backbone_lr_scale`` while the new
            layers (semantic head, classifier) learn at ``lr``: below 1 fine-tunes
            pretrained layers more gently than the new head.
        freeze_stages: the first N stages of the backbone are not trained
            (:func:`dpq.model.imagenet.backbone_stages`; 0: every layer learns).
    """

    epochs: int = 30
    time_budget_minutes: float | None = None
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "onecycle"
    warmup_fraction: float = 0.2
    schedule: str = "two_phase"
    quantization_start: float = 0.5
    codebook_lr: float = 1e-4
    crop_pad: int = 4
    flip: bool = True
    cutout: int = 0
    mixup_alpha: float = 0.0
    randaugment_ops: int = 0
    randaugment_magnitude: int = 9
    precision: str = "fp32"
    channels_last: bool = False
    ema_decay: float = 0.0
    grad_clip: float = 0.0
    seed: int = 0
    kmeans_iterations: int = 20
    final_kmeans: bool = False
    num_threads: int = 0
    keep_checkpoints: int = 2
    backbone_weights: str | None = None
    backbone_lr_scale: float = 1.0
    freeze_stages: int = 0

    def __post_init__(self) -> None:
        owner = "train"
        check_int(owner, "epochs", self.epochs, 1)
        if self.time_budget_minutes is not None:
            check_float(
                owner, "time_budget_minutes", self.time_budget_minutes, 0.0, strict_minimum=True
            )
        check_int(owner, "batch_size", self.batch_size, 1)
        check_choice(owner, "optimizer", self.optimizer, OPTIMIZERS)
        check_float(owner, "lr", self.lr, 0.0, strict_minimum=True)
        check_float(owner, "momentum", self.momentum, 0.0, 1.0)
        check_float(owner, "weight_decay", self.weight_decay)
        check_choice(owner, "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_float(owner, "warmup_fraction", self.warmup_fraction, 0.0, 1.0)
        check_choice(owner, "schedule", self.schedule, SCHEDULES)
        check_float(owner, "quantization_start", self.quantization_start, 0.0, 1.0)
        if self.schedule == "two_step" and self.quantization_start in (0.0, 1.0):
            raise ValueError(
                "train.quantization_start must be strictly between 0 and 1 for the two_step "
                f"schedule (features first, then codebooks); got {self.quantization_start}."
            )
        check_float(owner, "codebook_lr", self.codebook_lr, 0.0, strict_minimum=True)
        check_int(owner, "crop_pad", self.crop_pad, 0)
        check_bool(owner, "flip", self.flip)
        check_int(owner, "cutout", self.cutout, 0)
        check_float(owner, "mixup_alpha", self.mixup_alpha)
        check_int(owner, "randaugment_ops", self.randaugment_ops, 0)
        check_int(owner, "randaugment_magnitude", self.randaugment_magnitude, 0, 30)
        check_choice(owner, "precision", self.precision, PRECISIONS)
        check_bool(owner, "channels_last", self.channels_last)
        check_float(owner, "ema_decay", self.ema_decay, 0.0, 1.0, strict_maximum=True)
        check_float(owner, "grad_clip", self.grad_clip)
        check_int(owner, "seed", self.seed, 0)
        check_int(owner, "kmeans_iterations", self.kmeans_iterations, 1)
        check_bool(owner, "final_kmeans", self.final_kmeans)
        check_int(owner, "num_threads", self.num_threads, 0)
        check_int(owner, "keep_checkpoints", self.keep_checkpoints, 1)
        if self.backbone_weights is not None:
            check_text(owner, "backbone_weights", self.backbone_weights, "a file path or null")
        check_float(owner, "backbone_lr_scale", self.backbone_lr_scale, 0.0, strict_minimum=True)
        check_int(owner, "freeze_stages", self.freeze_stages, 0)


@dataclass(frozen=True)
class MethodConfig:
    """Which retrieval method (:mod:`dpq.methods`) builds the network, loss, codes and index.

    Attributes:
        name: a registered method: "dpq" (the default: the sections above describe it) or
            "sign" (a binary-hash sketch, :mod:`dpq.methods.binary_sketch`).
        bits: the code length of a method that trains one model per length (e.g. 32);
            None for "dpq", whose one model gives every prefix length up to L log2 K bits.
        options: the method's own settings, checked when the method is built (e.g.
            ``{"margin": 64.0, "alpha": 0.01}`` for "sign").
    """

    name: str = "dpq"
    bits: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_text("method", "name", self.name)
        if self.bits is not None:
            check_int("method", "bits", self.bits, 1)
        check_mapping("method", "options", self.options, "settings")
        try:
            json.dumps(dict(self.options), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"method.options must be JSON-ready values: {exc}.") from None
        object.__setattr__(self, "options", dict(self.options))


_Part = TypeVar("_Part", QuantizerConfig, ModelConfig, LossConfig, TrainConfig, MethodConfig)


def _check_keys(cls: type, keys: Mapping[str, Any], name: str, legacy: set[str]) -> None:
    """Every key must be a field of the section ``cls`` (or one of its ``legacy`` keys)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(keys) - known - legacy)
    if unknown:
        raise ValueError(
            f"config.{name} has unknown keys {unknown}; known keys are {sorted(known)}."
        )


def _part_from_dict(cls: type[_Part], data: object, name: str) -> _Part:
    if not isinstance(data, Mapping):
        raise ValueError(f"config.{name} must be a JSON object; got {type(data).__name__}.")
    _check_keys(cls, data, name, {"bf16"} if cls is TrainConfig else set())
    values = dict(data)
    if cls is TrainConfig and "bf16" in values:
        legacy = values.pop("bf16")  # configs written before "precision" existed
        check_bool("config.train", "bf16", legacy)
        values.setdefault("precision", "bf16" if legacy else "fp32")
    return cls(**values)  # lists of image_mean, image_std, level_weights become tuples there


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "quantizer": QuantizerConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "method": MethodConfig,
}


@dataclass(frozen=True)
class DPQConfig:
    """Everything needed to rebuild and retrain a model (a DPQ model unless ``method`` says
    otherwise); a config without a ``method`` section is a DPQ config."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(
                    f"config.{name} must be a {cls.__name__}; "
                    f"got {type(getattr(self, name)).__name__}."
                )
        weights = self.loss.level_weights
        if weights is not None and len(weights) != self.quantizer.num_levels:
            raise ValueError(
                f"loss.level_weights has {len(weights)} entries but quantizer.num_levels is "
                f"{self.quantizer.num_levels}; give one weight per level or null for all ones."
            )
        if self.model.multilabel and self.loss.label_smoothing > 0:
            raise ValueError(
                "loss.label_smoothing applies to single-label softmax cross-entropy only, and "
                "these labels are multi-label: pass --label-smoothing 0 (the cifar10 recipe "
                "sets 0.1), or set loss.label_smoothing to 0 in the recipe."
            )
        if self.model.feature == "class_posterior" and self.quantizer.dim < self.model.num_classes:
            raise ValueError(
                f"model.feature 'class_posterior' puts the {self.model.num_classes} class "
                f"probabilities into the D={self.quantizer.dim} feature coordinates; set "
                f"quantizer.dim to at least {self.model.num_classes}."
            )
        if self.model.feature == "class_posterior" and not self.loss.use_cls:
            raise ValueError(
                "model.feature 'class_posterior' quantizes the classifier's probabilities, but "
                "loss.use_cls is off, so no classifier is trained: use model.feature "
                "'semantic'."
            )
        if self.model.multilabel and self.train.mixup_alpha > 0:
            raise ValueError("train.mixup_alpha must be 0 for a multi-label model.")
        if self.train.schedule == "two_step" and not self.loss.uses_quantization:
            raise ValueError(
                "train.schedule 'two_step' trains codebooks in its second step, but every "
                "quantization loss (use_soft, use_hard, use_match) is off."
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DPQConfig:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on unknown keys or bad values."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a DPQ config must be a JSON object; got {type(data).__name__}.")
        parts = _SECTIONS
        unknown = sorted(set(data) - set(parts))
        if unknown:
            raise ValueError(f"config has unknown sections {unknown}; expected {sorted(parts)}.")
        return cls(
            **{
                name: _part_from_dict(part, data.get(name, {}), name)
                for name, part in parts.items()
            }
        )

    def to_json(self) -> str:
        """Indented JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DPQConfig:
        """Parse JSON text written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config is not valid JSON: {exc}.") from exc
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> DPQConfig:
        """Read a config JSON file (a ``config.json`` of a checkpoint, or a file you wrote).

        A checkpoint's ``config.json`` may hold extra top-level bookkeeping keys under
        ``"checkpoint"``; they are ignored here.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist.")
        try:
            data = json.loads(path.read_text()) if path.stat().st_size else None
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path} is not valid JSON: {exc}.") from exc
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "checkpoint"}
        return cls.from_dict(data)  # type: ignore[arg-type]

    def replace(self, **sections: Any) -> DPQConfig:
        """A copy with whole sections or single fields replaced.

        ``cfg.replace(quantizer={"num_levels": 2}, train=TrainConfig(epochs=3))``: a dict
        updates the named fields of that section, a config object replaces it.
        """
        updated: dict[str, Any] = {}
        for name, value in sections.items():
            if name not in _SECTIONS:
                raise ValueError(
                    f"unknown config section {name!r}; expected one of {', '.join(_SECTIONS)}."
                )
            current = getattr(self, name)
            if isinstance(value, Mapping):
                _check_keys(type(current), value, name, set())
                updated[name] = replace(current, **value)
            else:
                updated[name] = value
        return replace(self, **updated)


def config_differences(
    old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """Human-readable differences between two config dicts (e.g. ``to_dict()`` outputs):
    ``["quantizer.num_levels: 4 vs 2", ...]`` (first value from ``old``)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += config_differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} vs {new!r}"]
