"""What the deep quantization competitors share (DVSQ, DQN: :mod:`.dvsq`, :mod:`.dqn`): a tanh
head of D dimensions on the backbone, M = bits / 8 codebooks of K = 256 codewords learned with
it, codes of one byte per codebook, and a :class:`~dpq.index.DPQIndex` over the codebooks.

Network: backbone -> Linear(F, D) -> tanh, D = ``quantizer.dim`` (300 by default, the setting
DPQ's D and the label word vectors share), the head initialised at N(0, 0.01) as the
authors' fc8 (:meth:`~dpq.model.retrieval_network.HeadNetwork.new_head`). The codebooks are a
float (M, K, D) parameter, each codeword a full D-dimensional vector, optionally masked to a
block structure (product quantization: codebook m zero outside its block of dimensions); they
start uniform in [-1, 1], as in the authors' code.

Schedule (two phases): for the first ``warmup_epochs`` (default 1) the quantization loss is
off, as the authors' code keeps its weight at 0 before its first code update; when the
second phase starts, the codebooks are initialised by k-means in each block of dimensions on
the training features as the loss sees them (the authors' ``initial_centers``,
:func:`~dpq.methods.quantization_losses.pq_codebooks_by_kmeans`), and from then on each
batch's codes are assigned with the current codebooks (no gradient) and the quantization
loss trains the network and the codebooks together, the codebooks by Adam at
``train.codebook_lr``. (The authors alternate: network steps with codes and codebooks fixed,
and every two epochs new codes for the whole training set and closed-form codebooks; the
gradient steps on the same loss replace that outer loop, so the training loop is the one
every method uses.)

Codes: uint8 (N, M), one codeword index per codebook, assigned by the method's encoder;
searched by :class:`~dpq.index.DPQIndex` in the method's mode ("ip": inner product of the
query's features with the reconstruction; "aqd": squared distance), at the one length
``method.bits`` the model was trained for.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from dpq.config import DPQConfig
from dpq.devices import autocast
from dpq.methods.base import LossOutput, Phase, Step, StepOutput
from dpq.methods.per_length import (
    Option,
    PerLengthMethod,
    check_code_bits,
    check_requested_bits,
)
from dpq.methods.quantization_losses import pq_codebooks_by_kmeans, pq_encode, reconstruct
from dpq.model.retrieval_network import HeadNetwork

if TYPE_CHECKING:  # pragma: no cover
    from dpq.index import DPQIndex

CODEBOOK_SIZE = 256
"""K: codewords per codebook, one byte of code each (the papers' setting)."""
BITS_PER_CODEBOOK = 8
"""log2 K."""


def subspace_blocks(dim: int, num_codebooks: int) -> list[np.ndarray]:
    """The blocks of dimensions of product quantization: ``np.array_split`` of 0..D-1 into M
    contiguous blocks, as :func:`pq_codebooks_by_kmeans` cuts them."""
    return np.array_split(np.arange(dim), num_codebooks)


class QuantizationNetwork(HeadNetwork):
    """backbone -> Linear(F, D) -> tanh, and M codebooks of K codewords (module docstring).

    Subclasses name their method (:attr:`method_name`) and say whether the codebooks are
    block-structured (:attr:`block_codebooks`).
    """

    block_codebooks: ClassVar[bool] = False
    """Product quantization: codebook m is zero outside its block of dimensions."""

    def __init__(self, config: DPQConfig) -> None:
        super().__init__(config)
        bits = check_code_bits(str(self.method_name), config.method.bits)
        dim = config.quantizer.dim
        num_codebooks = bits // BITS_PER_CODEBOOK
        if num_codebooks > dim:
            raise ValueError(
                f"{bits} bits need M = {num_codebooks} codebooks, more than the D = {dim} "
                "feature dimensions; raise quantizer.dim or use fewer bits."
            )
        self.head = self.new_head(dim)
        self.codebooks = nn.Parameter(
            torch.empty(num_codebooks, CODEBOOK_SIZE, dim).uniform_(-1, 1)
        )
        mask = torch.ones(num_codebooks, 1, dim)
        if self.block_codebooks:
            mask.zero_()
            for m, block in enumerate(subspace_blocks(dim, num_codebooks)):
                mask[m, 0, int(block[0]) : int(block[-1]) + 1] = 1.0
        self.register_buffer("codebook_mask", mask, persistent=False)

    @property
    def feature_dim(self) -> int:
        """D."""
        return self.head.out_features

    @property
    def num_codebooks(self) -> int:
        """M."""
        return self.codebooks.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float32 (B, D): tanh(W f + b) of prepared inputs."""
        return torch.tanh(self.head(self.backbone(x))).float()

    def codebook_tensor(self) -> torch.Tensor:
        """float32 (M, K, D): the codebooks as the loss and the codes use them (masked to
        their blocks for product quantization), differentiable."""
        return self.codebooks * self.codebook_mask

    def codebook_array(self) -> np.ndarray:
        """float32 (M, K, D) copy of :meth:`codebook_tensor`."""
        return self.codebook_tensor().detach().float().cpu().numpy().copy()

    @torch.no_grad()
    def set_codebooks(self, codebooks: np.ndarray) -> None:
        """Copy float (M, K, D) codebooks in."""
        self.codebooks.copy_(torch.as_tensor(codebooks, dtype=self.codebooks.dtype))


class CodebookLoss(nn.Module):
    """A method's main loss plus lambda times its quantization loss, the latter only when the
    batch's codes are given (the second phase).

    Subclasses define :meth:`main_loss` (logged as :attr:`main_part`) and
    :meth:`quantization_loss`.

    Args:
        quantization_weight: lambda.
    """

    main_part: ClassVar[str] = "main"

    def __init__(self, quantization_weight: float) -> None:
        super().__init__()
        self.quantization_weight = quantization_weight

    @abstractmethod
    def main_loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Float scalar of float32 (B, D) features and their targets."""

    @abstractmethod
    def quantization_loss(
        self, features: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor
    ) -> torch.Tensor:
        """Float scalar of float32 (B, D) features, (M, K, D) codebooks, int (B, M) codes."""

    def forward(
        self,
        features: torch.Tensor,
        targets: torch.Tensor,
        codebooks: torch.Tensor | None = None,
        codes: torch.Tensor | None = None,
    ) -> LossOutput:
        """The loss of a batch: parts :attr:`main_part`, "quantization" (with codes) and
        "total"."""
        main = self.main_loss(features, targets)
        total = main
        parts = {self.main_part: float(main.detach())}
        if codebooks is not None and codes is not None:
            quantization = self.quantization_loss(features, codebooks, codes)
            total = total + self.quantization_weight * quantization
            parts["quantization"] = float(quantization.detach())
        parts["total"] = float(total.detach())
        return LossOutput(total, parts)


class CodebookMethod(PerLengthMethod):
    """A deep quantization method (module docstring): subclasses set :attr:`name`,
    :attr:`network_class`, :attr:`search_mode`, their encoder (:meth:`assign`), their loss
    and any further options (:meth:`codebook_options`)."""

    network_class: ClassVar[type[QuantizationNetwork]]
    search_mode: ClassVar[str] = "aqd"
    """How the index ranks: "aqd" (squared distance) or "ip" (inner product)."""
    shown_losses = (("total", "loss"), ("quantization", "Q"))

    def __init__(self, config: DPQConfig) -> None:
        super().__init__(config)
        self.num_codebooks = self.bits // BITS_PER_CODEBOOK

    def option_table(self) -> dict[str, Option]:
        """``warmup_epochs`` and the method's own settings (:meth:`codebook_options`)."""
        return {"warmup_epochs": Option(1, integer=True), **self.codebook_options()}

    def codebook_options(self) -> dict[str, Option]:
        """The method's own settings (name -> :class:`Option`), with its paper's defaults."""
        return {}

    # ------------------------------------------------------------------ loss

    @abstractmethod
    def assign(
        self, network: QuantizationNetwork, features: np.ndarray | torch.Tensor
    ) -> np.ndarray:
        """int64 (N, M) codes of float (N, D) features under the network's codebooks."""

    def prepare_step(self, network: QuantizationNetwork, loss: nn.Module) -> None:
        """Before each step's forward pass: what the network takes from the loss (nothing by
        default)."""

    def forward_loss(
        self,
        network: QuantizationNetwork,  # type: ignore[override]
        loss: nn.Module,
        x: torch.Tensor,
        targets: torch.Tensor,
        step: Step,
        precision: str,
    ) -> StepOutput:
        """The loss of a batch; in a phase that trains the codebooks also the quantization
        loss, with the batch's codes assigned by :meth:`assign` (no gradient)."""
        self.prepare_step(network, loss)
        with autocast(network.device, precision):
            features = network(x).float()
        codebooks = codes = None
        if step.phase.trains_codebooks:
            codebooks = network.codebook_tensor()
            assigned = self.assign(network, features.detach())
            codes = torch.from_numpy(assigned).to(features.device)
        return StepOutput(loss(features, targets, codebooks, codes), None)

    # ------------------------------------------------------------------ schedule

    @property
    def has_second_phase(self) -> bool:
        return True

    def second_phase_start(self, epochs: int) -> int:
        """After ``warmup_epochs`` (the last epoch quantizes at the latest)."""
        return min(int(self.options["warmup_epochs"]), epochs - 1)

    def phase(self, second: bool) -> Phase:
        if not second:
            return Phase("features")
        return Phase("quantization", trains_codebooks=True, init_codebooks="as_trained")

    # ------------------------------------------------------------------ codebooks

    def codebook_parameters(self, network: QuantizationNetwork) -> dict[str, nn.Parameter]:  # type: ignore[override]
        return {"codebooks": network.codebooks}

    def init_codebooks(self, network: QuantizationNetwork, features: np.ndarray) -> list[float]:  # type: ignore[override]
        """k-means in each block of dimensions (the authors' initialisation); returns the
        mean squared error of the features in each block."""
        train = self.config.train
        codebooks = pq_codebooks_by_kmeans(
            features,
            self.num_codebooks,
            CODEBOOK_SIZE,
            seed=train.seed,
            iterations=train.kmeans_iterations,
        )
        network.set_codebooks(codebooks)
        codes = torch.from_numpy(pq_encode(features, codebooks))
        residual = features - reconstruct(torch.from_numpy(codebooks), codes).numpy()
        blocks = subspace_blocks(features.shape[1], self.num_codebooks)
        return [float((residual[:, block] ** 2).sum(axis=1).mean()) for block in blocks]

    def describe_init(self, count: int, errors: list[float]) -> str:
        return (
            f"k-means codebook init (one block of dimensions per codebook) on {count} training "
            "features: mean squared error per block " + " ".join(f"{e:.4g}" for e in errors)
        )

    # ------------------------------------------------------------------ guards

    def check_training_set(self, num_items: int) -> None:
        if num_items < CODEBOOK_SIZE:
            raise ValueError(
                f"the {self.name} method's k-means codebook initialisation needs at least "
                f"K = {CODEBOOK_SIZE} training items; got {num_items}."
            )

    def learning_rates(self) -> dict[str, float]:
        return {"codebook": self.config.train.codebook_lr}

    # ------------------------------------------------------------------ codes and search

    def encode(
        self,
        network: QuantizationNetwork,  # type: ignore[override]
        features: np.ndarray,
        bits: int | None = None,
    ) -> np.ndarray:
        """uint8 (N, M): :meth:`assign`'s codes of float32 (N, D) features."""
        check_requested_bits(self.name, self.bits, bits)
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != network.feature_dim:
            raise ValueError(
                f"features must be float (N, {network.feature_dim}); got shape {features.shape}."
            )
        return self.assign(network, features).astype(np.uint8)

    def new_index(
        self,
        network: QuantizationNetwork,  # type: ignore[override]
        metadata: Mapping[str, Any] | None = None,
    ) -> DPQIndex:
        """A :class:`~dpq.index.DPQIndex` over the network's M codebooks (one "level" each),
        ranking by :attr:`search_mode`."""
        from dpq.index import DPQIndex

        return DPQIndex(
            network.codebook_array(),
            metadata=metadata,
            search_mode=self.search_mode,  # type: ignore[arg-type]
        )

    def load_index(self, path: str | Path) -> DPQIndex:
        from dpq.index import DPQIndex

        return DPQIndex.load(path)

    def search(
        self,
        index: DPQIndex,  # type: ignore[override]
        queries: np.ndarray,
        k: int,
        bits: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The index's search of float query features over every codebook."""
        check_requested_bits(self.name, self.bits, bits)
        return index.search(queries, k)
