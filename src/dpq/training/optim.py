"""How the network learns: its optimizer and parameter groups, the learning-rate schedule,
and the exponential moving average of its weights.

- :func:`build_optimizers`: the optimizers of a run by name, "network" and (for a method
  with codebooks) "codebooks" (:func:`codebook_optimizers`).
- :func:`network_optimizer`: SGD (Nesterov), Adam or AdamW over the network's parameter
  groups (:func:`network_parameter_groups`: weights with weight decay, biases and BatchNorm
  without; the backbone at ``lr * train.backbone_lr_scale``; frozen parameters and the
  method's codebooks left out: those have their own optimizer, see
  :meth:`dpq.methods.base.RetrievalMethod.codebook_optimizer`).
- :func:`learning_rate`: one-cycle, cosine or constant, with a linear warm-up;
  :func:`set_learning_rate` applies it to every group at its ``lr_scale``.
- :class:`WeightAverage`: the EMA of the weights and BatchNorm statistics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dpq.config import TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from dpq.methods.base import RetrievalMethod


def learning_rate(step: int, total_steps: int, peak: float, schedule: str, warmup: float) -> float:
    """Learning rate at ``step`` (0-based) of ``total_steps``.

    "onecycle": linear from 0 to ``peak`` over the warm-up steps, then linear to 0;
    "cosine": the same warm-up, then cosine decay to 0; "constant": ``peak``.
    """
    if schedule == "constant" or total_steps <= 0:
        return peak
    warmup_steps = warmup * total_steps
    position = step + 1
    if position <= warmup_steps:
        return peak * position / warmup_steps
    progress = (position - warmup_steps) / max(total_steps - warmup_steps, 1e-12)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "onecycle":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def network_parameter_groups(
    model: nn.Module, config: TrainConfig, excluded: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Parameter groups of the network optimizer: weights with weight decay, biases and
    BatchNorm without; the backbone's at ``lr_scale = config.backbone_lr_scale``, the new
    layers' at 1. Frozen parameters and those named in ``excluded`` are left out."""
    left_out = set(excluded)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if name in left_out or not param.requires_grad:
            continue
        scale = config.backbone_lr_scale if name.startswith("backbone.") else 1.0
        groups.setdefault((scale, param.ndim > 1), []).append(param)
    order = sorted(groups, key=lambda key: (-key[0], not key[1]))
    return [
        {
            "params": groups[key],
            "weight_decay": config.weight_decay if key[1] else 0.0,
            "lr_scale": key[0],
        }
        for key in order
    ]


def network_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """``config.optimizer`` over ``groups`` (from :func:`network_parameter_groups`) at
    ``config.lr``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.AdamW(groups, lr=config.lr)


def codebook_optimizers(
    model: nn.Module, method: RetrievalMethod
) -> dict[str, torch.optim.Optimizer]:
    """A fresh optimizer of the method's codebooks, ``{"codebooks": ...}``, or ``{}`` for a
    method without codebooks."""
    codebooks = method.codebook_parameters(model)  # type: ignore[arg-type]
    return {"codebooks": method.codebook_optimizer(codebooks.values())} if codebooks else {}


def build_optimizers(
    model: nn.Module, method: RetrievalMethod, config: TrainConfig
) -> dict[str, torch.optim.Optimizer]:
    """The optimizers of a run by name (the names its checkpoints use): "network" over the
    network's parameter groups without the codebooks, each group's ``lr_scale`` times the
    method's :meth:`~dpq.methods.base.RetrievalMethod.network_lr_scale`, and the codebooks'
    own."""
    codebooks = method.codebook_parameters(model)  # type: ignore[arg-type]
    groups = network_parameter_groups(model, config, codebooks)
    scale = method.network_lr_scale()
    for group in groups:
        group["lr_scale"] *= scale
    return {"network": network_optimizer(groups, config), **codebook_optimizers(model, method)}


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group learns at ``lr`` times its ``lr_scale`` (1 when it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class WeightAverage:
    """Exponential moving average of a model's floating-point state (weights and BatchNorm
    statistics); integer buffers are copied. Decay warms up as min(decay, (1+n)/(10+n)).

    Args:
        model: the model whose ``state_dict`` is averaged.
        decay: the decay once warmed up, in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current state into the average (once per step)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, value in model.state_dict().items():
            average = self.state[name]
            if average.dtype.is_floating_point:
                average.mul_(decay).add_(value.detach(), alpha=1 - decay)
            else:
                average.copy_(value)

    @torch.no_grad()
    def reset(self, model: nn.Module, names: Iterable[str]) -> None:
        """Copy the model's current values of the entries ``names`` (e.g. codebooks that
        were just initialised) into the average."""
        wanted = set(names)
        for name, value in model.state_dict().items():
            if name in wanted:
                self.state[name].copy_(value)
