"""Backbone registry: name -> factory(**kwargs) -> ``nn.Module`` mapping inputs to (B, F).

Every backbone has an ``out_features`` attribute (F) and an ``input_kind`` attribute:
"images" (float (B, 3, H, W), already normalised) or "features" (float (B, F_in), for
precomputed features). Built-in names:

- "resnet9": a CIFAR-sized ResNet-9 (DAWNBench / Page style), trained from scratch.
- "small_cnn": a tiny CNN for small images such as the 8x8 digits.
- "identity": precomputed features (``in_features`` given).
- "torchvision:<name>" and "timm:<name>": adapters that import those packages lazily and
  load weights only from a local file (``weights="path/to/file"``, safetensors or a plain
  state dict); nothing is downloaded.

:func:`create_backbone` builds one; :func:`register_backbone` adds a factory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

BackboneFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, BackboneFactory] = {}
OPTIONAL_PREFIXES: tuple[str, ...] = ("torchvision:", "timm:")


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
    if name.startswith("torchvision:"):
        return _torchvision_backbone(name.split(":", 1)[1], **kwargs)  # type: ignore[arg-type]
    if name.startswith("timm:"):
        return _timm_backbone(name.split(":", 1)[1], **kwargs)  # type: ignore[arg-type]
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


def _load_local_weights(module: nn.Module, weights: str | Path, owner: str) -> None:
    """Load a state dict from a local safetensors file or a plain tensor file."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{owner}: weights file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        # weights_only=True: tensors and plain containers only, never arbitrary objects.
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{owner}: {path} does not hold a state dict of tensors.")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith(("fc.", "classifier.", "head."))]:
        raise ValueError(
            f"{owner}: weights in {path} do not match the model: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}."
        )


class _FeatureAdapter(nn.Module):
    """Wraps a classification network whose head was removed; output (B, F)."""

    input_kind = "images"

    def __init__(self, body: nn.Module, out_features: int) -> None:
        super().__init__()
        self.body = body
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.body(x), 1)


def _missing_package(name: str, package: str) -> ValueError:
    return ValueError(
        f"backbone {name!r} needs the {package} package, which is not installed; install it "
        f"(pip install 'dpq[backbones]') or choose a built-in backbone: "
        f"{', '.join(available_backbones())}."
    )


def _torchvision_backbone(
    model_name: str, weights: str | None = None, image_size: int = 224
) -> nn.Module:
    try:
        import torchvision.models as tv_models
    except ImportError as exc:
        raise _missing_package(f"torchvision:{model_name}", "torchvision") from exc
    factory = getattr(tv_models, model_name, None)
    if not callable(factory):
        raise ValueError(f"torchvision has no model named {model_name!r}.")
    net = factory(weights=None)
    if weights is not None:
        _load_local_weights(net, weights, f"torchvision:{model_name}")
    for head in ("fc", "classifier", "head", "heads"):
        if hasattr(net, head):
            setattr(net, head, nn.Identity())
            break
    with torch.no_grad():
        was_training = net.training
        net.eval()
        out = net(torch.zeros(1, 3, image_size, image_size))
        net.train(was_training)
    return _FeatureAdapter(net, int(torch.flatten(out, 1).shape[1]))


def _timm_backbone(model_name: str, weights: str | None = None) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise _missing_package(f"timm:{model_name}", "timm") from exc
    if weights is None:
        net = timm.create_model(model_name, pretrained=False, num_classes=0)
    else:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"timm:{model_name}: weights file {weights} does not exist.")
        # timm reads the local file itself (and drops the classifier weights); no download.
        net = timm.create_model(
            model_name,
            pretrained=True,
            num_classes=0,
            pretrained_cfg_overlay={"file": str(weights)},
        )
    return _FeatureAdapter(net, int(net.num_features))
