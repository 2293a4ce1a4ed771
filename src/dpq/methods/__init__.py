"""What a retrieval method is (:mod:`.base`: its head on the backbone, its loss, its training
schedule and hooks, how its features become codes and which index searches them), and the
registry of methods by the name ``config.method.name`` gives:

- "dpq" (:mod:`.dpq`): Deep Progressive Quantization, the default;
- "sign" (:mod:`.binary_sketch`): sign codes of a tanh head with DSH's contrastive loss,
  searched by Hamming distance (a sketch of the hashing competitors);
- the competitors of the paper's Table 1, each trained once per code length
  (``method.bits``): the deep quantization methods "dvsq" (:mod:`.dvsq`) and "dqn"
  (:mod:`.dqn`), codebooks searched by a :class:`~dpq.index.DPQIndex`
  (:mod:`.quantization_method`), and the deep hashing methods "dsh" (:mod:`.dsh`), "dhn"
  (:mod:`.dhn`), "hashnet" (:mod:`.hashnet`) and "csq" (:mod:`.csq`), sign codes searched by
  Hamming distance (:mod:`.hashing_method`). Their settings are ``method.options``
  (:mod:`.per_length`).

The losses of DPQ (and of the methods that share them) are :mod:`.losses`. A new method
subclasses :class:`~dpq.methods.base.RetrievalMethod` and is added with
:func:`register_method`; the training loop, checkpoints and search then find it by name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dpq.config import DPQConfig
from dpq.methods.base import RetrievalMethod
from dpq.methods.binary_sketch import SignHashMethod
from dpq.methods.csq import CSQMethod
from dpq.methods.dhn import DHNMethod
from dpq.methods.dpq import DPQMethod
from dpq.methods.dqn import DQNMethod
from dpq.methods.dsh import DSHMethod
from dpq.methods.dvsq import DVSQMethod
from dpq.methods.hashnet import HashNetMethod
from dpq.model.files import read_checkpoint_config
from dpq.model.retrieval_network import RetrievalNetwork

_REGISTRY: dict[str, type[RetrievalMethod]] = {}


def register_method(method: type[RetrievalMethod]) -> type[RetrievalMethod]:
    """Add a method class under its ``name`` (usable as a class decorator)."""
    if not isinstance(method, type) or not issubclass(method, RetrievalMethod):
        raise TypeError(f"a method must subclass RetrievalMethod; got {method!r}.")
    _REGISTRY[method.name] = method
    return method


def available_methods() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[RetrievalMethod]:
    """The method class registered as ``name``; ValueError listing the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; known methods are {', '.join(available_methods())}."
        ) from None


def method_for(config: DPQConfig) -> RetrievalMethod:
    """The method ``config.method`` names, built from ``config`` (which it checks)."""
    return method_class(config.method.name)(config)


def load_network(
    path: str | Path,
    config: DPQConfig | None = None,
    device: str | torch.device = "cpu",
    channels_last: bool | None = None,
) -> RetrievalNetwork:
    """Load the network of a checkpoint directory of any registered method, in eval mode
    (arguments as :meth:`RetrievalNetwork.from_checkpoint`)."""
    saved, _ = read_checkpoint_config(path)
    network = method_class(saved.method.name).network_class
    return network.from_checkpoint(path, config, device, channels_last)


for _method in (
    DPQMethod,
    SignHashMethod,
    DVSQMethod,
    DQNMethod,
    DSHMethod,
    DHNMethod,
    HashNetMethod,
    CSQMethod,
):
    register_method(_method)

__all__ = [
    "CSQMethod",
    "DHNMethod",
    "DPQMethod",
    "DQNMethod",
    "DSHMethod",
    "DVSQMethod",
    "HashNetMethod",
    "RetrievalMethod",
    "SignHashMethod",
    "available_methods",
    "load_network",
    "method_class",
    "method_for",
    "register_method",
]
