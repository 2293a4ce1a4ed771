"""The backbone registry doubles as a test matrix: every registered backbone gets the same
forward/backward/shape test."""

import importlib.util

import pytest
import torch

from dpq.model.backbones import available_backbones, create_backbone

# Small keyword arguments and a matching input per registered name.
EXAMPLES = {
    "resnet9": ({"width": 0.125}, (2, 3, 16, 16)),
    "small_cnn": ({"width": 0.25}, (2, 3, 8, 8)),
    "identity": ({"in_features": 7}, (2, 7)),
    "alexnet": ({}, (1, 3, 63, 63)),
    "resnet18": ({}, (2, 3, 16, 16)),
    "resnet50": ({}, (2, 3, 16, 16)),
}


def test_every_registered_backbone_has_an_example():
    assert set(available_backbones()) == set(EXAMPLES)


@pytest.mark.parametrize("name", available_backbones())
def test_forward_backward_and_shape(name):
    kwargs, shape = EXAMPLES[name]
    torch.manual_seed(0)
    backbone = create_backbone(name, **kwargs)
    assert backbone.input_kind in ("images", "features")
    x = torch.randn(*shape, requires_grad=True)
    out = backbone(x)
    assert out.shape == (shape[0], backbone.out_features)
    assert out.dtype == torch.float32
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for param in backbone.parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all()


@pytest.mark.parametrize(
    ("pool", "width", "features"), [("max", 0.5, 256), ("avg", 0.25, 128), ("maxavg", 0.5, 512)]
)
def test_resnet9_width_and_pooling(pool, width, features):
    backbone = create_backbone("resnet9", width=width, pool=pool)
    assert backbone.out_features == features
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, features)


def test_unknown_names_and_bad_arguments():
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        create_backbone("vgg")
    with pytest.raises(ValueError, match="bad arguments"):
        create_backbone("resnet9", depth=18)
    with pytest.raises(ValueError, match="in_features"):
        create_backbone("identity", in_features=0)
    with pytest.raises(ValueError, match="pool"):
        create_backbone("resnet9", pool="median")
    with pytest.raises(ValueError, match=r"\(B, 7\)"):
        create_backbone("identity", in_features=7)(torch.zeros(2, 8))


@pytest.mark.parametrize("package", ["torchvision", "timm"])
def test_optional_adapters_say_which_package_is_missing(package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here; the missing-package message cannot show")
    with pytest.raises(ValueError, match=f"needs the {package} package"):
        create_backbone(f"{package}:resnet18")
