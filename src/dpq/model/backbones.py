"""Backbone registry: name -> factory(**kwargs) -> ``nn.Module`` mapping inputs to (B, F).

Every backbone has an ``out_features`` attribute (F) and an ``input_kind`` attribute:
"images" (float (B, 3, H, W), already normalised) or "features" (float (B, F_in), for
precomputed features). Built-in names:

- "resnet9": a CIFAR-sized ResNet-9 (DAWNBench / Page style), trained from scratch.
- "small_cnn": a tiny CNN for small images such as the 8x8 digits.
- "identity": precomputed features (``in_features`` given).
- "alexnet", "resnet18", "resnet50": ImageNet networks laid out exactly as torchvision's
  (:mod:`dpq.model.imagenet`, where their weights files are read): "alexnet" gives the
  paper's fc7 (4096-d, after ReLU), the ResNets their pooled features (512-d, 2048-d).
- "torchvision:<name>" and "timm:<name>": those packages' networks (imported lazily), with
  the classification head removed (AlexNet/VGG: the last Linear, so fc7).

:func:`input_defaults` says which image size and normalisation a backbone expects
(ImageNet's mean/std for the ImageNet networks). :func:`create_backbone` builds one;
:func:`register_backbone` adds a factory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dpq.model.imagenet import AlexNetFc7, FeatureAdapter, ImageNetResNet

BackboneFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, BackboneFactory] = {}
OPTIONAL_PREFIXES: tuple[str, ...] = ("torchvision:", "timm:")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputDefaults:
    """What a backbone expects of its images.

    Attributes:
        image_size: the side of the square images it was designed (and pretrained) for.
        mean, std: per-channel normalisation on a 0..1 scale (ImageNet's for ImageNet nets).
    """

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator adding ``factory`` to the registry under ``name``."""

    def decorate(factory: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY:
            raise ValueError(f"a backbone named {name!r} is already registered.")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_backbones() -> list[str]:
    """Names of the registered (always available) backbones, without the optional adapters."""
    return sorted(_REGISTRY)


def create_backbone(name: str, **kwargs: object) -> nn.Module:
    """Build the backbone ``name`` with the factory's keyword arguments.

    Raises:
        ValueError: unknown name, bad keyword arguments, or a missing optional package.
    """
    try:
        if name.startswith("torchvision:"):
            return _torchvision_backbone(name.split(":", 1)[1], **kwargs)  # type: ignore[arg-type]
        if name.startswith("timm:"):
            return _timm_backbone(name.split(":", 1)[1], **kwargs)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ValueError(f"bad arguments {kwargs} for backbone {name!r}: {exc}.") from exc
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of {', '.join(available_backbones())}, "
            f"or 'torchvision:<model>' / 'timm:<model>' with those packages installed."
        )
    try:
        module = _REGISTRY[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments {kwargs} for backbone {name!r}: {exc}.") from exc
    return module


def _conv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _GlobalPool(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in ("max", "avg", "maxavg"):
            raise ValueError(f"pool must be 'max', 'avg' or 'maxavg'; got {mode!r}.")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "max":
            return torch.amax(x, dim=(2, 3))
        if self.mode == "avg":
            return x.mean(dim=(2, 3))
        return torch.cat([torch.amax(x, dim=(2, 3)), x.mean(dim=(2, 3))], dim=1)


class ResNet9(nn.Module):
    """CIFAR-sized ResNet-9 (Page, "How to train your ResNet"; DAWNBench).

    prep conv 64w -> [conv 128w, max-pool, residual(2 convs)] -> [conv 256w, max-pool]
    -> [conv 512w, max-pool, residual(2 convs)] -> global pool. Every conv is 3x3 + BatchNorm
    + ReLU.

    Args:
        width: channel multiplier w (0.5 gives 32/64/128/256 channels).
        pool: global pooling, "max", "avg" or "maxavg" (both, concatenated).

    Input float (B, 3, H, W) (H, W divisible by 8 keeps every pool exact); output (B, F) with
    F = 512w (1024w for "maxavg").
    """

    input_kind = "images"

    def __init__(self, width: float = 0.5, pool: str = "max") -> None:
        super().__init__()
        if not isinstance(width, int | float) or isinstance(width, bool) or width <= 0:
            raise ValueError(f"resnet9 width must be a positive number; got {width!r}.")
        c1, c2, c3, c4 = (max(1, round(c * width)) for c in (64, 128, 256, 512))
        self.layers = nn.Sequential(
            _conv_bn(3, c1),
            _conv_bn(c1, c2),
            nn.MaxPool2d(2),
            _Residual(c2),
            _conv_bn(c2, c3),
            nn.MaxPool2d(2),
            _conv_bn(c3, c4),
            nn.MaxPool2d(2),
            _Residual(c4),
        )
        self.pool = _GlobalPool(pool)
        self.out_features = c4 * (2 if pool == "maxavg" else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(x))


class SmallCNN(nn.Module):
    """A three-conv network for tiny images (e.g. sklearn's 8x8 digits).

    conv 32c -> conv 64c -> max-pool -> conv 128c -> global average pool; F = 128c.

    Args:
        width: channel multiplier c.
    """

    input_kind = "images"

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        if not isinstance(width, int | float) or isinstance(width, bool) or width <= 0:
            raise ValueError(f"small_cnn width must be a positive number; got {width!r}.")
        c1, c2, c3 = (max(1, round(c * width)) for c in (32, 64, 128))
        self.layers = nn.Sequential(
            _conv_bn(3, c1), _conv_bn(c1, c2), nn.MaxPool2d(2, ceil_mode=True), _conv_bn(c2, c3)
        )
        self.out_features = c3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).mean(dim=(2, 3))


class IdentityBackbone(nn.Module):
    """Passes precomputed features through: float (B, in_features) -> (B, in_features)."""

    input_kind = "features"

    def __init__(self, in_features: int) -> None:
        super().__init__()
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(
                f"the identity backbone needs in_features, a positive integer (the width of the "
                f"precomputed features); got {in_features!r}."
            )
        self.out_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.out_features:
            raise ValueError(
                f"identity backbone expects features of shape (B, {self.out_features}); "
                f"got {tuple(x.shape)}."
            )
        return x


@register_backbone("resnet9")
def _resnet9(width: float = 0.5, pool: str = "max") -> nn.Module:
    return ResNet9(width=width, pool=pool)


@register_backbone("small_cnn")
def _small_cnn(width: float = 1.0) -> nn.Module:
    return SmallCNN(width=width)


@register_backbone("identity")
def _identity(in_features: int) -> nn.Module:
    return IdentityBackbone(in_features)


# ----------------------------------------------------------------------------------------
# ImageNet networks in torchvision's layout (:mod:`dpq.model.imagenet`)


@register_backbone("alexnet")
def _alexnet(dropout: float = 0.5) -> nn.Module:
    return AlexNetFc7(dropout=dropout)


@register_backbone("resnet18")
def _resnet18() -> nn.Module:
    return ImageNetResNet(18)


@register_backbone("resnet50")
def _resnet50() -> nn.Module:
    return ImageNetResNet(50)


_INPUT_DEFAULTS = {
    # AlexNet: 227 px, the crop of Caffe's AlexNet that the DPQ/DVSQ reference code feeds
    # (torchvision trains it at 224; its adaptive pool gives 6 x 6 at both sizes)
    "alexnet": InputDefaults(227),
    "resnet18": InputDefaults(224),
    "resnet50": InputDefaults(224),
}


def input_defaults(name: str) -> InputDefaults | None:
    """Image size and normalisation a backbone expects, or None where it has no preference
    (the from-scratch networks, whose normalisation is measured on the training images).

    torchvision networks: 224 px (299 for inception_v3) and ImageNet's mean/std; timm
    networks: their pretrained config's input size, mean and std when timm imports.
    """
    if name in _INPUT_DEFAULTS:
        return _INPUT_DEFAULTS[name]
    if name.startswith("torchvision:"):
        return InputDefaults(299 if name.endswith("inception_v3") else 224)
    if name.startswith("timm:"):
        try:
            import timm

            cfg = timm.get_pretrained_cfg(name.split(":", 1)[1])
        except Exception:  # timm missing or unusable here, or no such config
            return InputDefaults(224)
        if cfg is None:
            return InputDefaults(224)
        side = int(cfg.input_size[-1])
        return InputDefaults(side, tuple(cfg.mean), tuple(cfg.std))  # type: ignore[arg-type]
    return None


# ----------------------------------------------------------------------------------------
# torchvision and timm


def _missing_package(name: str, package: str, exc: BaseException) -> ValueError:
    if isinstance(exc, ImportError) and getattr(exc, "name", None) == package:
        problem = f"the {package} package, which is not installed; install it (pip install 'dpq[backbones]')"
    else:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        problem = (
            f"the {package} package, which is installed but does not import ({first}): its "
            "build does not match this torch; install the release built for it"
        )
    return ValueError(
        f"backbone {name!r} needs {problem}, or choose a built-in backbone: "
        f"{', '.join(available_backbones())} ('alexnet', 'resnet18' and 'resnet50' load "
        "torchvision's weight files)."
    )


def _remove_head(net: nn.Module) -> tuple[str, ...]:
    """Replace the classifier of a torchvision network by an identity; returns the state-dict
    prefixes of what was removed. AlexNet / VGG: the last Linear of ``classifier`` (fc8),
    so the output is fc7; ResNets and others: ``fc``, ``classifier``, ``head`` or ``heads``."""
    classifier = getattr(net, "classifier", None)
    if isinstance(classifier, nn.Sequential) and isinstance(classifier[-1], nn.Linear):
        last = len(classifier) - 1
        classifier[last] = nn.Identity()
        return (f"classifier.{last}.",)
    for head in ("fc", "classifier", "head", "heads"):
        if hasattr(net, head):
            setattr(net, head, nn.Identity())
            return (f"{head}.",)
    return ()


def _torchvision_backbone(model_name: str, image_size: int = 224) -> nn.Module:
    try:
        import torchvision.models as tv_models
    except Exception as exc:  # not installed, or built for another torch
        raise _missing_package(f"torchvision:{model_name}", "torchvision", exc) from exc
    factory = getattr(tv_models, model_name, None)
    if not callable(factory):
        raise ValueError(f"torchvision has no model named {model_name!r}.")
    net = factory(weights=None)
    heads = _remove_head(net)
    with torch.no_grad():
        was_training = net.training
        net.eval()
        out = net(torch.zeros(1, 3, image_size, image_size))
        net.train(was_training)
    return FeatureAdapter(net, int(torch.flatten(out, 1).shape[1]), heads)


def _timm_backbone(model_name: str) -> nn.Module:
    try:
        import timm
    except Exception as exc:  # not installed, or its torchvision does not import
        raise _missing_package(f"timm:{model_name}", "timm", exc) from exc
    try:
        net = timm.create_model(model_name, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise ValueError(f"timm has no model named {model_name!r} ({exc}).") from None
    return FeatureAdapter(net, int(net.num_features), ("fc.", "head.", "classifier.", "head.fc."))
