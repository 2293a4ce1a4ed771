"""dpq.training.optim: the learning-rate schedules, the network's parameter groups and
optimizer, and the weight average, each on a tiny module."""

import pytest
import torch
from torch import nn

from dpq.config import TrainConfig
from dpq.training.optim import (
    WeightAverage,
    learning_rate,
    network_optimizer,
    network_parameter_groups,
    set_learning_rate,
)


def test_learning_rate_schedules():
    total = 100
    onecycle = [learning_rate(s, total, 1.0, "onecycle", 0.2) for s in range(total)]
    assert onecycle[19] == pytest.approx(1.0) and onecycle[-1] == pytest.approx(0.0)
    assert all(a <= b for a, b in zip(onecycle[:20], onecycle[1:20], strict=False))
    cosine = [learning_rate(s, total, 1.0, "cosine", 0.1) for s in range(total)]
    assert max(cosine) == pytest.approx(1.0) and cosine[-1] == pytest.approx(0.0, abs=1e-9)
    assert learning_rate(5, total, 0.3, "constant", 0.2) == 0.3
    assert learning_rate(5, 0, 0.3, "onecycle", 0.2) == 0.3  # no steps: the peak


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, 2)
        self.codebooks = nn.Parameter(torch.zeros(2, 4))


def test_parameter_groups_split_decay_scale_the_backbone_and_leave_out_what_is_asked():
    model = _Tiny()
    model.backbone[0].bias.requires_grad_(False)  # frozen: left out
    config = TrainConfig(weight_decay=0.01, backbone_lr_scale=0.1)
    groups = network_parameter_groups(model, config, excluded=["codebooks"])
    by_key = {(g["lr_scale"], g["weight_decay"]): g["params"] for g in groups}
    # new layers first, weights before biases
    assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [
        (1.0, 0.01), (1.0, 0.0), (0.1, 0.01), (0.1, 0.0)
    ]  # fmt: skip
    assert by_key[(1.0, 0.01)] == [model.head.weight]
    assert by_key[(0.1, 0.01)] == [model.backbone[0].weight]
    assert by_key[(0.1, 0.0)] == [model.backbone[1].weight, model.backbone[1].bias]
    grouped = {id(p) for g in groups for p in g["params"]}
    assert id(model.codebooks) not in grouped and id(model.backbone[0].bias) not in grouped


@pytest.mark.parametrize(
    "name, kind",
    [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)],
)
def test_network_optimizer_and_scaled_learning_rates(name, kind):
    model = _Tiny()
    config = TrainConfig(optimizer=name, lr=0.2, backbone_lr_scale=0.5)
    optimizer = network_optimizer(network_parameter_groups(model, config), config)
    assert isinstance(optimizer, kind)
    set_learning_rate(optimizer, 0.04)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx(
        [0.02, 0.02, 0.04, 0.04]
    )
    if name == "sgd":
        assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9


def test_weight_average_warms_up_averages_floats_copies_integers_and_resets_by_name():
    model = _Tiny()
    with torch.no_grad():
        model.head.weight.zero_()
    average = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        model.head.weight.fill_(1.0)
        model.codebooks.fill_(3.0)
    model.backbone[1].num_batches_tracked.fill_(7)
    average.update(model)  # decay min(0.9, 2/11): 0 * 2/11 + 1 * 9/11
    weight = average.state["head.weight"]
    torch.testing.assert_close(weight, torch.full_like(weight, 9 / 11))
    assert int(average.state["backbone.1.num_batches_tracked"]) == 7
    assert average.updates == 1
    average.reset(model, ["codebooks"])
    torch.testing.assert_close(average.state["codebooks"], model.codebooks.detach())
    torch.testing.assert_close(average.state["head.weight"], torch.full_like(weight, 9 / 11))


def test_build_optimizers_scale_the_network_by_the_methods_lr_scale():
    from conftest import method_config
    from dpq.methods import method_for
    from dpq.training.optim import build_optimizers

    scales = {}
    for options in ({}, {"lr_scale": 0.5}):
        config = method_config("dqn", options=options).replace(train={"backbone_lr_scale": 0.1})
        method = method_for(config)
        optimizers = build_optimizers(method.build_network(), method, config.train)
        assert set(optimizers) == {"network", "codebooks"}
        scales[method.network_lr_scale()] = sorted(
            g["lr_scale"] for g in optimizers["network"].param_groups
        )
    assert scales[1.0] == pytest.approx([1.0, 1.0])  # the head (identity backbone: no params)
    assert scales[0.5] == pytest.approx([0.5, 0.5])
