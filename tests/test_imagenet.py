"""dpq.model.imagenet: the ImageNet networks have torchvision's state dict and compute what
torchvision's compute; weights load from local files only, and a wrong file is a clear
error; frozen stages stop learning."""

import json
from pathlib import Path

import pytest
import torch

from dpq.model.backbones import IMAGENET_MEAN, create_backbone, input_defaults
from dpq.model.imagenet import backbone_stages, freeze_stages, load_backbone_weights

TORCHVISION_LAYOUT = Path(__file__).parent / "data" / "torchvision_state_dicts.json"


def _torchvision_models():
    """torchvision.models where the package imports with its compiled operators, else None
    (PyPI's torchvision 0.28.0 is a CUDA build: beside the CPU build of torch it fails with
    'operator torchvision::nms does not exist')."""
    try:
        import torchvision.models as models
    except Exception:
        return None
    return models


@pytest.mark.parametrize("name", ["alexnet", "resnet18", "resnet50"])
def test_imagenet_networks_have_torchvisions_state_dict(name):
    """Names and shapes as torchvision 0.28.0's own networks (recorded in tests/data),
    less the ImageNet classifier, which the backbone leaves out."""
    reference = json.loads(TORCHVISION_LAYOUT.read_text())[name]
    backbone = create_backbone(name)
    heads = backbone.head_prefixes
    assert {k: list(v.shape) for k, v in backbone.state_dict().items()} == {
        k: v for k, v in reference.items() if not k.startswith(heads)
    }
    assert all(any(k.startswith(h) for k in reference) for h in heads)
    assert input_defaults(name).mean == IMAGENET_MEAN
    assert len(backbone_stages(backbone)) == {"alexnet": 7, "resnet18": 5, "resnet50": 5}[name]


@pytest.mark.skipif(_torchvision_models() is None, reason="torchvision does not import here")
@pytest.mark.parametrize(("name", "side"), [("alexnet", 227), ("resnet18", 64)])
def test_imagenet_networks_compute_what_torchvision_computes(name, side):
    reference = getattr(_torchvision_models(), name)(weights=None).eval()
    ours = create_backbone(name).eval()
    ours.load_state_dict(
        {k: v for k, v in reference.state_dict().items() if not k.startswith(ours.head_prefixes)}
    )
    adapter = create_backbone(f"torchvision:{name}", image_size=side).eval()
    adapter.body.load_state_dict(reference.state_dict(), strict=False)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), adapter(x))
    assert adapter.out_features == ours.out_features


def test_the_torchvision_adapter_says_why_it_cannot_be_used():
    if _torchvision_models() is not None:
        pytest.skip("torchvision imports here; its adapter is tested above")
    with pytest.raises(ValueError, match="needs the torchvision package") as info:
        create_backbone("torchvision:alexnet")
    assert "'alexnet', 'resnet18' and 'resnet50' load torchvision's weight files" in str(info.value)


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    """A randomly initialised AlexNet saved as torchvision's file holds it (the 14 tensors
    of the backbone plus the ImageNet classifier, classifier.6), and the network."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = create_backbone("alexnet").eval()
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    state["classifier.6.weight"] = torch.randn(1000, 4096) * 0.01
    state["classifier.6.bias"] = torch.zeros(1000)
    path = tmp_path_factory.mktemp("weights") / "alexnet.safetensors"
    save_file(state, str(path))
    return path, net


def test_weights_from_a_file_give_the_saved_networks_features(alexnet_file, tmp_path, no_network):
    path, saved = alexnet_file
    torch.manual_seed(1)
    fresh = create_backbone("alexnet").eval()
    x = torch.randn(2, 3, 67, 67)
    assert not torch.equal(fresh(x), saved(x))
    assert load_backbone_weights(fresh, path) == {"loaded": 14, "ignored": 2}
    torch.testing.assert_close(fresh(x), saved(x), rtol=0, atol=0)
    # the same tensors written by torch.save (torchvision's .pth form, DDP's "module." names)
    torch.save({f"module.{k}": v for k, v in saved.state_dict().items()}, tmp_path / "a.pth")
    torch.nn.init.zeros_(fresh.classifier[4].weight)
    load_backbone_weights(fresh, tmp_path / "a.pth")
    torch.testing.assert_close(fresh(x), saved(x), rtol=0, atol=0)


def test_a_wrong_weights_file_is_a_clear_error(alexnet_file, tmp_path):
    from safetensors.torch import save_file

    alexnet, resnet18 = create_backbone("alexnet"), create_backbone("resnet18")
    other = dict(resnet18.state_dict())
    other["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"do not fit the AlexNetFc7 backbone: 14 tensors missing"):
        load_backbone_weights(alexnet, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"of another shape \(e\.g\. layer1\.0\.conv1\.weight"):
        load_backbone_weights(resnet18, tmp_path / "other.safetensors")
    with open(alexnet_file[0], "rb") as handle:
        (tmp_path / "truncated.safetensors").write_bytes(handle.read(1 << 20))
    with pytest.raises(ValueError, match="not a readable safetensors file .* truncated"):
        load_backbone_weights(alexnet, tmp_path / "truncated.safetensors")
    torch.save({"w": torch.zeros(1000)}, tmp_path / "small.pth")
    pth = (tmp_path / "small.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(pth[: len(pth) // 2])
    with pytest.raises(ValueError, match="not a readable weights file"):
        load_backbone_weights(alexnet, tmp_path / "truncated.pth")
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "pickled-object.pth")
    with pytest.raises(ValueError, match="files holding Python objects, are refused"):
        load_backbone_weights(alexnet, tmp_path / "pickled-object.pth")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_backbone_weights(alexnet, tmp_path / "absent.safetensors")


def test_freezing_stages_stops_their_gradients_and_batchnorm_statistics():
    backbone = create_backbone("resnet18")
    frozen = freeze_stages(backbone, 2)  # stem and layer1
    assert len(frozen) == 2
    assert (
        not backbone.conv1.weight.requires_grad
        and not backbone.layer1[0].conv1.weight.requires_grad
    )
    assert backbone.layer2[0].conv1.weight.requires_grad
    with pytest.raises(ValueError, match="the backbone has 5"):
        freeze_stages(create_backbone("resnet18"), 6)


def test_the_no_network_guard_catches_a_connection(no_network):
    import socket
    import urllib.request

    with pytest.raises(no_network):
        socket.create_connection(("127.0.0.1", 9))
    with pytest.raises(no_network):
        urllib.request.urlopen("https://example.com/alexnet.pth")


def test_an_adapted_network_loads_the_weights_of_its_body(tmp_path):
    """A FeatureAdapter's file is the wrapped network's state dict (its head ignored)."""
    from safetensors.torch import save_file

    from dpq.model.imagenet import FeatureAdapter, ImageNetResNet

    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))
    adapter = FeatureAdapter(body, 4, ("fc.",))
    x = torch.randn(2, 3, 8, 8)
    assert adapter(x).shape == (2, 4)
    state = {k: torch.randn_like(v) for k, v in body.state_dict().items()}
    save_file({**state, "fc.weight": torch.zeros(10, 4)}, str(tmp_path / "body.safetensors"))
    assert load_backbone_weights(adapter, tmp_path / "body.safetensors") == {
        "loaded": 2,
        "ignored": 1,
    }
    torch.testing.assert_close(body[0].weight, state["0.weight"], rtol=0, atol=0)
    assert len(backbone_stages(adapter)) == 1  # the one child with parameters
    with pytest.raises(ValueError, match="one of 18, 50"):
        ImageNetResNet(34)
