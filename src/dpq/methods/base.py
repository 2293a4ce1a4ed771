"""What a trained retrieval method is: one interface the training loop, encoding and search
ask, so that none of them knows a method by name.

A :class:`RetrievalMethod` is built from a :class:`~dpq.config.DPQConfig` (its ``method``
section names it; :func:`dpq.methods.method_for` finds it) and answers:

- its network, the head on the backbone (:meth:`~RetrievalMethod.build_network`, a
  :class:`~dpq.model.retrieval_network.RetrievalNetwork`), and its loss
  (:meth:`~RetrievalMethod.build_loss`, :meth:`~RetrievalMethod.forward_loss`: the loss of a
  whole batch, so losses over pairs within a batch fit, with a :class:`Step` that carries
  the epoch and step for values scheduled over training, such as HashNet's beta);
- its schedule: one phase, or two (:meth:`~RetrievalMethod.second_phase_start`,
  :meth:`~RetrievalMethod.phase`), each a :class:`Phase` saying whether the network and the
  codebooks learn and what happens when it starts (weights averaged, codebooks initialised
  from the training features);
- its codebooks, for methods that learn them apart from the network (their parameters, their
  optimizer, their initialisation from features, their loss on frozen features);
- its codes and search: the code lengths one network gives, features -> codes, the index
  that holds them (AQD over codebooks, Hamming over binary codes) and how it is searched.

The loop runs whatever the method says; the method never sees ranks, checkpoints or clocks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from dpq.config import DPQConfig

if TYPE_CHECKING:  # pragma: no cover
    from dpq.model.retrieval_network import RetrievalNetwork


@dataclass(frozen=True)
class LossOutput:
    """Total loss and its parts.

    Attributes:
        total: float scalar tensor to back-propagate.
        parts: name -> float value of each active term (e.g. DPQ's "semantic", "cls",
            "quan", "quan_hard", "match", "E") and "total", for logging.
    """

    total: torch.Tensor
    parts: dict[str, float]


@dataclass(frozen=True)
class Phase:
    """What the epochs of one training phase do (methods subclass it to add the settings of
    their forward pass, e.g. DPQ's ``quantize`` and ``detach``).

    Attributes:
        name: for the log ("features", "quantization", "training").
        trains_network: False: the network is frozen; its eval-mode features of the
            training set are computed once and only the codebooks learn on them
            (:meth:`RetrievalMethod.frozen_features_loss`).
        trains_codebooks: the codebook optimizer steps.
        average_network_first: on entering the phase, the network takes its weight average
            (when one is kept), e.g. before it is frozen.
        init_codebooks: on entering the phase, initialise the codebooks
            (:meth:`RetrievalMethod.init_codebooks`) from the training features "as_trained"
            (train mode: BatchNorm on batch statistics) or "eval"; None: leave them.
    """

    name: str
    trains_network: bool = True
    trains_codebooks: bool = False
    average_network_first: bool = False
    init_codebooks: str | None = None


@dataclass(frozen=True)
class Step:
    """Where one training step stands, for values scheduled over training.

    Attributes:
        phase: the phase the step belongs to.
        epoch: 0-based epoch.
        step: 0-based step of the run (``epoch * steps_per_epoch + step of the epoch``).
        total_steps: steps of the whole run as planned now.
    """

    phase: Phase
    epoch: int = 0
    step: int = 0
    total_steps: int = 1

    @property
    def progress(self) -> float:
        """Fraction of the run done before this step, in [0, 1]."""
        return min(1.0, self.step / max(self.total_steps, 1))


@dataclass(frozen=True)
class StepOutput:
    """What :meth:`RetrievalMethod.forward_loss` returns.

    Attributes:
        loss: the batch's loss.
        logits: float (B, C) classifier output (for the training accuracy), or None for a
            method without a classifier.
    """

    loss: LossOutput
    logits: torch.Tensor | None


class CodeIndex(Protocol):
    """What every method's index offers (search takes each index's own queries, so it goes
    through :meth:`RetrievalMethod.search`)."""

    @property
    def ntotal(self) -> int: ...

    def add(self, codes: Any, ids: Any = None, labels: Any = None) -> np.ndarray: ...

    def save(self, path: str | Path) -> Path: ...


class RetrievalMethod(ABC):
    """A retrieval method: network, loss, schedule, codebooks, codes and search.

    Args:
        config: the full configuration; ``config.method`` names this method and holds its
            bits and options (checked here: ``ValueError`` naming the field and the fix).
    """

    name: ClassVar[str]
    """The name ``config.method.name`` gives (the registry key)."""
    network_class: ClassVar[type[RetrievalNetwork]]
    """The network class :meth:`build_network` builds and a checkpoint loads into."""
    shown_losses: ClassVar[tuple[tuple[str, str], ...]] = (("total", "loss"),)
    """(loss part, label) pairs shown in progress lines."""

    def __init__(self, config: DPQConfig) -> None:
        if config.method.name != self.name:
            raise ValueError(
                f"config.method.name is {config.method.name!r}, not {self.name!r}; build the "
                "method with dpq.methods.method_for(config)."
            )
        self.config = config

    # ------------------------------------------------------------------ network and loss

    def build_network(self) -> RetrievalNetwork:
        """A freshly initialised network (seed torch first for a reproducible one)."""
        return self.network_class(self.config)

    @property
    def uses_word_vectors(self) -> bool:
        """Whether :meth:`build_loss` needs label word vectors (C, ``quantizer.dim``): a run
        then asks for them (a file, or "orthogonal") before it loads anything."""
        return False

    @abstractmethod
    def build_loss(self, word_vectors: np.ndarray | None) -> nn.Module:
        """The loss module (moved to the network's device by the caller).

        Args:
            word_vectors: float (C, D) label word vectors, or None; a method whose loss
                needs them raises ``ValueError`` when they are missing or do not fit.
        """

    @abstractmethod
    def forward_loss(
        self,
        network: RetrievalNetwork,
        loss: nn.Module,
        x: torch.Tensor,
        targets: torch.Tensor,
        step: Step,
        precision: str,
    ) -> StepOutput:
        """The loss of one batch.

        Args:
            network: the network in train mode.
            loss: the module :meth:`build_loss` made.
            x: prepared inputs (:meth:`RetrievalNetwork.prepare_inputs`).
            targets: int64 (B,) class ids, or float (B, C) multi-hot labels or mixed
                probabilities.
            step: the phase and position of the step.
            precision: "fp32", "bf16" or "fp16": the autocast of the network's forward pass.
        """

    # ------------------------------------------------------------------ schedule

    @property
    def has_second_phase(self) -> bool:
        """True when training runs in two phases (:meth:`second_phase_start` < epochs)."""
        return False

    def second_phase_start(self, epochs: int) -> int:
        """First epoch (0-based) of the second phase of a run of ``epochs`` (``epochs``: none)."""
        return epochs

    def phase(self, second: bool) -> Phase:
        """The first or the second phase."""
        return Phase("training")

    def timed_phase(self) -> Phase:
        """The phase whose steps a time budget measures (default: the last one)."""
        return self.phase(second=self.has_second_phase)

    # ------------------------------------------------------------------ codebooks

    def codebook_parameters(self, network: RetrievalNetwork) -> dict[str, nn.Parameter]:
        """Name -> parameter of what the codebook optimizer trains (left out of the network
        optimizer); empty for a method without codebooks."""
        return {}

    def codebook_optimizer(self, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The codebooks' optimizer: Adam at ``train.codebook_lr`` (reference code)."""
        return torch.optim.Adam(list(parameters), lr=self.config.train.codebook_lr)

    def init_codebooks(self, network: RetrievalNetwork, features: np.ndarray) -> list[float]:
        """Set the codebooks from float32 (N, D) training features; returns per-level errors
        for the log. Only called for a phase with ``init_codebooks`` set."""
        raise ValueError(f"the {self.name!r} method has no codebooks to initialise.")

    def describe_init(self, count: int, errors: list[float]) -> str:
        """The log line after :meth:`init_codebooks` on ``count`` features."""
        return f"codebooks initialised on {count} training features"

    def final_codebook_init(self) -> bool:
        """Initialise the codebooks once more on the final eval-mode features after training."""
        return False

    def frozen_features_loss(
        self, network: RetrievalNetwork, loss: nn.Module, features: torch.Tensor
    ) -> LossOutput:
        """The codebooks' loss on float32 (B, D) features of the frozen network (a phase with
        ``trains_network`` false); ``total`` is what is back-propagated."""
        raise ValueError(f"the {self.name!r} method has no phase with a frozen network.")

    # ------------------------------------------------------------------ guards

    def check_training_set(self, num_items: int) -> None:
        """ValueError when ``num_items`` training items cannot train this method (the
        default accepts any number; the loop itself needs 2)."""
        return None

    def learning_rates(self) -> dict[str, float]:
        """Learning rates besides the network's, named for a divergence message."""
        return {}

    def network_lr_scale(self) -> float:
        """Multiplier of the network's learning rate (``train.lr`` and its schedule) for this
        method: 1 (the recipe's rate) unless the method's options say otherwise."""
        return 1.0

    def divergence_hint(self, bad_terms: Iterable[str]) -> str:
        """Advice (starting with "; ") when these loss parts became non-finite, or ""."""
        return ""

    # ------------------------------------------------------------------ codes and search

    @abstractmethod
    def code_lengths(self) -> tuple[int, ...]:
        """The code lengths in bits one trained network gives, shortest first (DPQ: every
        prefix of its L levels; a hashing method: its one ``method.bits``)."""

    @abstractmethod
    def encode(
        self, network: RetrievalNetwork, features: np.ndarray, bits: int | None = None
    ) -> np.ndarray:
        """Codes of float32 (N, D) searched features (:meth:`RetrievalNetwork.extract_features`)
        at ``bits`` (default the longest), in the layout :meth:`new_index` adds."""

    @abstractmethod
    def new_index(
        self, network: RetrievalNetwork, metadata: Mapping[str, Any] | None = None
    ) -> CodeIndex:
        """An empty index for this network's codes."""

    @abstractmethod
    def load_index(self, path: str | Path) -> CodeIndex:
        """An index file written by the index of :meth:`new_index`."""

    @abstractmethod
    def search(
        self, index: CodeIndex, queries: np.ndarray, k: int, bits: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest items of float32 (nq, D) query features at ``bits`` (default the
        longest): distances (nq, w) ascending and ids int64 (nq, w), w <= k as the index
        gives it, -1 where fewer items are reachable; equal distances in ascending database
        order (the tie rule of :mod:`dpq.evaluate.metrics`)."""
