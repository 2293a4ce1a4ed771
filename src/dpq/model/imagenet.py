"""ImageNet classification networks as backbones, and pretrained weights for them.

- :class:`AlexNetFc7`, :class:`ImageNetResNet` (depth 18 or 50): the networks laid out
  exactly as torchvision's (the same state-dict names and shapes, so torchvision's ImageNet
  weight files load into them), without torchvision; they end before the ImageNet
  classifier (AlexNet at fc7, 4096-d after ReLU; the ResNets at their pooled features).
- :class:`FeatureAdapter`: another package's classification network (torchvision, timm)
  with its head removed, as a backbone.
- :func:`read_state_dict`, :func:`load_backbone_weights`: weights from a local file only
  (safetensors, or a state dict read with ``torch.load(weights_only=True)``); nothing is
  downloaded.
- :func:`backbone_stages`, :func:`freeze_stages`: a network's stages, input to output, and
  fixing the first N of them for fine-tuning.

The registry that builds them by name is :mod:`dpq.model.backbones`.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

# ----------------------------------------------------------------------------------------
# ImageNet networks in torchvision's layout (the same module names, so the same state dict)


class _StagedBackbone(nn.Module):
    """An ImageNet network whose parts are listed by :meth:`stages` (input to output)."""

    input_kind = "images"
    head_prefixes: tuple[str, ...] = ()
    """State-dict prefixes of the ImageNet classifier, which a weights file may hold and
    the backbone does not (it ends before the classifier)."""

    def stages(self) -> list[nn.Module]:
        raise NotImplementedError


class AlexNetFc7(_StagedBackbone):
    """AlexNet (Krizhevsky et al., 2012) as torchvision defines it, ending at fc7: the
    4096-d output of the second fully connected layer after its ReLU, the feature the paper
    fine-tunes (section 2.1). Module names match ``torchvision.models.alexnet`` (``features``,
    ``avgpool``, ``classifier``), so its ImageNet weights load; the ImageNet classifier
    (``classifier.6``) is not part of it.

    Input float (B, 3, H, W) with H, W >= 63 (224 or 227 in practice); output (B, 4096).
    Stages: conv1 .. conv5, fc6, fc7.
    """

    head_prefixes = ("classifier.6.",)

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
        )
        self.out_features = 4096

    def stages(self) -> list[nn.Module]:
        f, c = self.features, self.classifier
        return [f[0:3], f[3:6], f[6:8], f[8:10], f[10:13], c[0:3], c[3:6]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ImageNetResNet(_StagedBackbone):
    """ResNet (He et al., 2016) as torchvision defines it (v1.5: the stride in the 3x3
    convolution), ending at the global average pool. Module names match
    ``torchvision.models.resnet18/50``, so their ImageNet weights load; ``fc`` is not part
    of it. Stages: the stem (conv1, bn1), layer1 .. layer4.

    Args:
        depth: 18 (basic blocks, F = 512) or 50 (bottlenecks, F = 2048).
    """

    head_prefixes = ("fc.",)
    _LAYOUTS = {18: (_BasicBlock, (2, 2, 2, 2)), 50: (_Bottleneck, (3, 4, 6, 3))}

    def __init__(self, depth: int = 18) -> None:
        super().__init__()
        if depth not in self._LAYOUTS:
            raise ValueError(f"ResNet depth must be one of 18, 50; got {depth!r}.")
        block, counts = self._LAYOUTS[depth]
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, counts[0], 1)
        self.layer2 = self._make_layer(block, 128, counts[1], 2)
        self.layer3 = self._make_layer(block, 256, counts[2], 2)
        self.layer4 = self._make_layer(block, 512, counts[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.out_features = 512 * block.expansion
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def _make_layer(self, block: type, planes: int, count: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None) for _ in range(1, count)]
        return nn.Sequential(*layers)

    def stages(self) -> list[nn.Module]:
        stem = nn.ModuleList([self.conv1, self.bn1])
        return [stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class FeatureAdapter(nn.Module):
    """A classification network whose head was removed (``head_prefixes``: the state-dict
    prefixes of what was removed), as a backbone: float (B, 3, H, W) -> (B, out_features)."""

    input_kind = "images"

    def __init__(
        self, body: nn.Module, out_features: int, head_prefixes: tuple[str, ...] = ()
    ) -> None:
        super().__init__()
        self.body = body
        self.out_features = out_features
        self.head_prefixes = head_prefixes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.body(x), 1)


# ----------------------------------------------------------------------------------------
# stages and freezing


def backbone_stages(backbone: nn.Module) -> list[nn.Module]:
    """The stages of a backbone, input to output (:func:`freeze_stages` counts them):
    AlexNet conv1..conv5, fc6, fc7; ResNets stem, layer1..layer4; a torchvision ResNet the
    same; other networks: their top-level children in order."""
    if isinstance(backbone, _StagedBackbone):
        return backbone.stages()
    body = getattr(backbone, "body", backbone)
    if all(hasattr(body, name) for name in ("conv1", "layer1", "layer4")):
        stem = nn.ModuleList([body.conv1, body.bn1])
        return [stem, body.layer1, body.layer2, body.layer3, body.layer4]
    return [child for child in body.children() if any(True for _ in child.parameters())]


def freeze_stages(backbone: nn.Module, count: int) -> list[nn.Module]:
    """Freeze the first ``count`` stages of ``backbone`` (:func:`backbone_stages`): their
    parameters stop requiring gradients and the stages are put in eval mode (BatchNorm
    keeps its statistics; :class:`dpq.model.network.DPQModel` keeps them there in training mode).

    Returns the frozen stages. Raises ValueError when ``count`` exceeds the stages.
    """
    stages = backbone_stages(backbone)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"the number of frozen stages must be >= 0; got {count!r}.")
    if count > len(stages):
        raise ValueError(
            f"cannot freeze {count} stages: the backbone has {len(stages)}; give at most "
            f"{len(stages)} (0 trains every layer)."
        )
    for stage in stages[:count]:
        for param in stage.parameters():
            param.requires_grad_(False)
        stage.eval()
    return stages[:count]


# ----------------------------------------------------------------------------------------
# weights from a local file


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file: safetensors, or a file written by ``torch.save``
    holding a state dict (read with ``weights_only=True``: tensors and plain containers
    only; a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is opened, a leading
    ``module.`` of every name, as DistributedDataParallel writes it, is dropped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a truncated, corrupt or foreign file, or one that holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist; pass a local .safetensors or .pth file "
            "(nothing is downloaded)."
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: object = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(
                f"{path} is not a readable safetensors file ({exc}); it may be truncated or "
                "corrupt: copy it again."
            ) from None
    else:
        try:
            # weights_only=True: tensors and plain containers, never arbitrary objects.
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"{path} is not a readable weights file ({first}); give a safetensors file "
                "or a state dict saved with torch.save (truncated or corrupt files, and "
                "files holding Python objects, are refused)."
            ) from None
        for wrapper in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} holds no state dict of tensors.")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(state):
        raise ValueError(f"{path} holds entries that are not tensors; give a plain state dict.")
    if all(name.startswith("module.") for name in tensors):
        tensors = {name[len("module.") :]: value for name, value in tensors.items()}
    return tensors


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> dict[str, int]:
    """Load pretrained weights from a local file into ``backbone`` (in place).

    Every tensor of the backbone must be in the file with its shape; the file may also
    hold the ImageNet classifier that the backbone leaves out (AlexNet's ``classifier.6``,
    a ResNet's ``fc``), which is ignored. Anything else is an error, so a file of another
    architecture is refused rather than half loaded.

    Returns ``{"loaded": tensors loaded, "ignored": classifier tensors skipped}``.

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable file, or its tensors do not
        fit the backbone (the message names the first differences).
    """
    state = read_state_dict(path)
    target = (
        getattr(backbone, "body", backbone) if isinstance(backbone, FeatureAdapter) else backbone
    )
    heads = tuple(getattr(backbone, "head_prefixes", ()))
    expected = target.state_dict()
    ignored = [name for name in state if name not in expected and name.startswith(heads)]
    unexpected = [name for name in state if name not in expected and not name.startswith(heads)]
    missing = [name for name in expected if name not in state]
    wrong_shape = [
        f"{name} {tuple(state[name].shape)} (expected {tuple(value.shape)})"
        for name, value in expected.items()
        if name in state and tuple(state[name].shape) != tuple(value.shape)
    ]
    if missing or unexpected or wrong_shape:
        kind = type(target).__name__
        details = []
        if missing:
            details.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            details.append(f"{len(unexpected)} unknown (e.g. {', '.join(unexpected[:3])})")
        if wrong_shape:
            details.append(f"{len(wrong_shape)} of another shape (e.g. {wrong_shape[0]})")
        raise ValueError(
            f"the weights in {path} do not fit the {kind} backbone: {'; '.join(details)}. "
            "They are probably another architecture's; give the file of this network (for "
            "'alexnet', torchvision's ImageNet AlexNet state dict)."
        )
    target.load_state_dict({name: state[name] for name in expected}, strict=True)
    return {"loaded": len(expected), "ignored": len(ignored)}
