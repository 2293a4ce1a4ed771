"""What the deep binary-hashing methods share (DSH, DHN, HashNet, CSQ: :mod:`.dsh`, :mod:`.dhn`,
:mod:`.hashnet`, :mod:`.csq`): a hash layer on the backbone, sign codes, and a Hamming-distance
index.

The network is backbone -> Linear(F, bits) (the hash layer, z, initialised at N(0, 0.01) as
the authors' new layers: :meth:`~dpq.model.retrieval_network.HeadNetwork.new_head`) -> tanh for
the methods whose paper squashes it (DSH's outputs stay real-valued). The searched features are those outputs
(averaged with the mirrored image when ``model.tta_flip``); an item's code is their sign,
bit b = 1 where output b > 0, packed into uint8 (N, bits / 8) as ``np.packbits`` packs them,
and searched by Hamming distance in a :class:`~dpq.index.binary.BinaryIndex` (faiss
``IndexBinaryFlat``): a query is coded the same way. One network per code length
(``method.bits``, a multiple of 8), one training phase, no codebooks, no classifier; every
loss is over the pairs (or items) of a batch, and under DistributedDataParallel over those
of each rank's share of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from dpq.config import DPQConfig
from dpq.devices import autocast, full_precision
from dpq.methods.base import LossOutput, Step, StepOutput
from dpq.methods.per_length import PerLengthMethod, check_code_bits, check_requested_bits
from dpq.model.retrieval_network import HeadNetwork, RetrievalNetwork

if TYPE_CHECKING:  # pragma: no cover
    from dpq.index.binary import BinaryIndex


class HashingNetwork(HeadNetwork):
    """backbone -> Linear(F, bits) -> tanh (or no squashing when :attr:`squash` is False).

    Subclasses name their method (:attr:`method_name`) and say whether the outputs are
    squashed.
    """

    squash: ClassVar[bool] = True
    """tanh on the hash layer (False: its real-valued outputs are the features)."""

    def __init__(self, config: DPQConfig) -> None:
        super().__init__(config)
        bits = check_code_bits(str(self.method_name), config.method.bits)
        self.hash_head = self.new_head(bits)

    @property
    def feature_dim(self) -> int:
        """bits."""
        return self.hash_head.out_features

    def hash_layer(self, x: torch.Tensor) -> torch.Tensor:
        """float32 (B, bits): z = W f + b of prepared inputs, before any squashing."""
        return self.hash_head(self.backbone(x)).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float32 (B, bits): tanh(z), or z for a network that does not squash."""
        z = self.hash_layer(x)
        return torch.tanh(z) if self.squash else z


class BatchLoss(nn.Module):
    """A method's loss function with its settings bound, as the module the loop holds.

    Args:
        function: ``function(outputs, targets, *extra) -> float scalar tensor``.
    """

    def __init__(self, function: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.function = function

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor, *extra: Any) -> LossOutput:
        """The loss of float (B, bits) outputs with their labels (int64 (B,) or (B, C))."""
        with full_precision(outputs.device):
            total = self.function(outputs.float(), targets, *extra)
        return LossOutput(total, {"total": float(total.detach())})


class BinaryHashMethod(PerLengthMethod):
    """A hashing method: sign codes of :class:`HashingNetwork` outputs, Hamming search.

    Subclasses set :attr:`name` and :attr:`network_class`, list their settings
    (:meth:`option_table`, besides ``lr_scale``) and build their loss; ``self.options`` holds
    the checked values.
    """

    network_class: ClassVar[type[HashingNetwork]]

    def __init__(self, config: DPQConfig) -> None:
        super().__init__(config)
        if config.train.mixup_alpha > 0:
            raise ValueError(
                f"the {self.name} method's loss needs each item's own labels: set "
                "train.mixup_alpha to 0."
            )

    def training_outputs(
        self, network: HashingNetwork, x: torch.Tensor, step: Step, precision: str
    ) -> torch.Tensor:
        """float32 (B, bits): what the loss reads (default: the network's outputs)."""
        with autocast(network.device, precision):
            return network(x).float()

    def loss_extras(self, network: HashingNetwork) -> tuple[torch.Tensor, ...]:
        """What the loss reads from the network besides its outputs and the targets
        (:class:`BatchLoss`'s ``*extra``): nothing by default."""
        return ()

    def forward_loss(
        self,
        network: RetrievalNetwork,
        loss: nn.Module,
        x: torch.Tensor,
        targets: torch.Tensor,
        step: Step,
        precision: str,
    ) -> StepOutput:
        outputs = self.training_outputs(network, x, step, precision)  # type: ignore[arg-type]
        extras = self.loss_extras(network)  # type: ignore[arg-type]
        return StepOutput(loss(outputs, targets, *extras), None)

    # ------------------------------------------------------------------ codes and search

    def encode(
        self, network: RetrievalNetwork | None, features: np.ndarray, bits: int | None = None
    ) -> np.ndarray:
        """uint8 (N, bits / 8): bit b of an item is 1 where output b > 0 (``np.packbits``
        order). The network is not needed (the features are its outputs)."""
        check_requested_bits(self.name, self.bits, bits)
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.bits:
            raise ValueError(
                f"features must be float (N, {self.bits}); got shape {features.shape}."
            )
        return np.packbits(features > 0, axis=1)

    def new_index(
        self, network: RetrievalNetwork, metadata: Mapping[str, Any] | None = None
    ) -> BinaryIndex:
        from dpq.index.binary import BinaryIndex

        return BinaryIndex(self.bits, metadata)

    def load_index(self, path: str | Path) -> BinaryIndex:
        from dpq.index.binary import BinaryIndex

        return BinaryIndex.load(path)

    def search(
        self,
        index: BinaryIndex,  # type: ignore[override]
        queries: np.ndarray,
        k: int,
        bits: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Hamming search of the queries' sign codes: int32 distances, int64 ids."""
        return index.search(self.encode(None, queries, bits), k)
