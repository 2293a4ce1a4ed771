"""DPQ as a :class:`~dpq.methods.base.RetrievalMethod`: the network of
:class:`~dpq.model.network.DPQModel` (semantic head, classifier, progressive quantizer), the
loss of :class:`~dpq.methods.losses.DPQLoss`, codes by greedy residual assignment and a
:class:`~dpq.index.DPQIndex` searched by AQD at any prefix.

Its schedule follows ``train.schedule``:

- "end_to_end" (the paper): before ``quantization_start`` the network learns with
  L_S + lambda L_C; from then on with L_S + lambda L_C + tau E, E reaching the network.
- "two_phase" (reference code): the same phases, but E is computed on detached features, so
  it trains the codebooks only while L_S + lambda L_C keep training the network. (The
  reference alternates a network step and a codebook step; with detached features one
  backward pass gives both steps on the same batch.)
- "two_step" (Table 2): the network learns with L_S + lambda L_C, is then frozen (its
  weight average, when one is kept), and the codebooks alone learn E on its features.

When the quantization phase starts, the codebooks are initialised by residual k-means on the
training features (``quantizer.init == "kmeans"``); they learn with Adam at
``train.codebook_lr``. One trained network gives every code length l log2 K, l = 1..L.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dpq.config import DPQConfig
from dpq.devices import autocast, full_precision
from dpq.methods.base import LossOutput, Phase, RetrievalMethod, Step, StepOutput
from dpq.methods.losses import DPQLoss
from dpq.model.network import DPQModel

if TYPE_CHECKING:  # pragma: no cover
    from dpq.index import DPQIndex

QUANTIZATION_TERMS = frozenset({"E", "quan", "quan_hard", "match"})
"""Loss parts of E (Eq. 21)."""


@dataclass(frozen=True)
class DPQPhase(Phase):
    """A DPQ phase; ``quantize``: run the quantizer and add tau E; ``detach``: E reads
    detached features (it trains the codebooks only)."""

    quantize: bool = False
    detach: bool = False


class DPQMethod(RetrievalMethod):
    """Deep Progressive Quantization (Gao et al., IJCAI 2019); see the module docstring."""

    name = "dpq"
    network_class = DPQModel
    shown_losses = (("total", "loss"), ("semantic", "L_S"), ("cls", "L_C"), ("E", "E"))

    def __init__(self, config: DPQConfig) -> None:
        super().__init__(config)
        method = config.method
        longest = config.quantizer.num_levels * config.quantizer.bits_per_level
        if method.bits is not None and method.bits != longest:
            raise ValueError(
                f"method.bits is {method.bits}, but a DPQ model's codes are L log2 K = {longest} "
                "bits (every prefix of them is a shorter code); leave method.bits unset and set "
                "quantizer.num_levels and quantizer.codebook_size instead."
            )
        if method.options:
            raise ValueError(
                f"the dpq method takes no method.options (got {sorted(method.options)}); its "
                "settings are the quantizer, loss and train sections."
            )

    # ------------------------------------------------------------------ network and loss

    @property
    def uses_word_vectors(self) -> bool:
        """The semantic loss L_S (``loss.use_semantic``) reads them."""
        return self.config.loss.use_semantic

    def build_loss(self, word_vectors: np.ndarray | None) -> DPQLoss:
        config = self.config
        return DPQLoss(
            config.loss,
            word_vectors,
            num_classes=config.model.num_classes,
            num_levels=config.quantizer.num_levels,
            dim=config.quantizer.dim,
            multilabel=config.model.multilabel,
        )

    def forward_loss(
        self,
        network: DPQModel,  # type: ignore[override]
        loss: nn.Module,
        x: torch.Tensor,
        targets: torch.Tensor,
        step: Step,
        precision: str,
    ) -> StepOutput:
        phase = step.phase
        quantize = isinstance(phase, DPQPhase) and phase.quantize
        detach = isinstance(phase, DPQPhase) and phase.detach
        with autocast(network.device, precision):
            out = network(x, quantize=quantize, detach_quantizer_input=detach)
        total = loss(out.semantic, out.logits.float(), targets, out.quantized, out.quantizer_input)
        return StepOutput(total, out.logits)

    # ------------------------------------------------------------------ schedule

    @property
    def has_second_phase(self) -> bool:
        return self.config.loss.uses_quantization

    def second_phase_start(self, epochs: int) -> int:
        """First epoch (0-based) of the quantization phase."""
        if not self.config.loss.uses_quantization:
            return epochs
        start = math.floor(self.config.train.quantization_start * epochs + 1e-9)
        if self.config.train.schedule == "two_step":
            return min(max(start, 1), epochs - 1) if epochs > 1 else 0
        return min(start, epochs - 1)

    def phase(self, second: bool) -> DPQPhase:
        schedule = self.config.train.schedule
        detach = schedule == "two_phase"
        if not second:
            return DPQPhase("features", detach=detach)
        kmeans = self.config.quantizer.init == "kmeans"
        if schedule == "two_step":
            return DPQPhase(
                "quantization",
                trains_network=False,
                trains_codebooks=True,
                average_network_first=True,
                init_codebooks="eval" if kmeans else None,
                quantize=True,
            )
        return DPQPhase(
            "quantization",
            trains_codebooks=True,
            init_codebooks="as_trained" if kmeans else None,
            quantize=True,
            detach=detach,
        )

    def timed_phase(self) -> DPQPhase:
        """Network steps with E on whenever the run quantizes (the slowest steps)."""
        quantize = self.config.loss.uses_quantization
        return DPQPhase("timing", trains_codebooks=quantize, quantize=quantize)

    # ------------------------------------------------------------------ codebooks

    def codebook_parameters(self, network: DPQModel) -> dict[str, nn.Parameter]:  # type: ignore[override]
        return {"quantizer.codebooks": network.quantizer.codebooks}

    def init_codebooks(self, network: DPQModel, features: np.ndarray) -> list[float]:  # type: ignore[override]
        """Residual k-means codebooks (:meth:`ProgressiveQuantizer.init_kmeans`)."""
        return network.quantizer.init_kmeans(
            features,
            iterations=self.config.train.kmeans_iterations,
            seed=self.config.train.seed,
        ).tolist()

    def describe_init(self, count: int, errors: list[float]) -> str:
        return (
            f"k-means codebook init on {count} training features: mean squared error per "
            "level " + " ".join(f"{e:.4g}" for e in errors)
        )

    def final_codebook_init(self) -> bool:
        return self.config.train.final_kmeans or not self.config.loss.uses_quantization

    def frozen_features_loss(
        self,
        network: DPQModel,  # type: ignore[override]
        loss: nn.Module,
        features: torch.Tensor,
    ) -> LossOutput:
        """tau E of the codebooks on frozen features (two-step); the logged parts are E's,
        with "total" = E."""
        if not isinstance(loss, DPQLoss):
            raise TypeError(f"the DPQ method needs its DPQLoss; got {type(loss).__name__}.")
        with full_precision(features.device):
            energy, terms = loss.energy(features, network.quantizer(features))
        parts = {name: float(value.detach()) for name, value in terms.items()}
        parts["total"] = parts["E"]
        return LossOutput(self.config.loss.tau * energy, parts)

    # ------------------------------------------------------------------ guards

    def check_training_set(self, num_items: int) -> None:
        quantizer = self.config.quantizer
        if quantizer.init == "kmeans" and num_items < quantizer.codebook_size:
            raise ValueError(
                f"k-means initialisation needs at least K = {quantizer.codebook_size} "
                f"training items; got {num_items}. Use a smaller codebook (--codebook-size), "
                "more training items, or the normal initialisation "
                '(--config FILE with {"quantizer": {"init": "normal"}}).'
            )

    def learning_rates(self) -> dict[str, float]:
        return {"codebook": self.config.train.codebook_lr}

    def divergence_hint(self, bad_terms: Iterable[str]) -> str:
        if QUANTIZATION_TERMS & set(bad_terms):
            return "; the quantization loss is non-finite, so also try a smaller --tau"
        return ""

    # ------------------------------------------------------------------ codes and search

    def code_lengths(self) -> tuple[int, ...]:
        quantizer = self.config.quantizer
        return tuple(
            level * quantizer.bits_per_level for level in range(1, quantizer.num_levels + 1)
        )

    def levels(self, bits: int | None) -> int | None:
        """The number of levels l of a ``bits``-bit code (None: all L)."""
        if bits is None:
            return None
        if bits not in self.code_lengths():
            raise ValueError(
                f"a DPQ model with L = {self.config.quantizer.num_levels} levels of "
                f"{self.config.quantizer.bits_per_level} bits gives codes of "
                f"{', '.join(map(str, self.code_lengths()))} bits; got {bits}."
            )
        return bits // self.config.quantizer.bits_per_level

    def encode(
        self,
        network: DPQModel,  # type: ignore[override]
        features: np.ndarray,
        bits: int | None = None,
    ) -> np.ndarray:
        """uint8/uint16 (N, l) codes, l = bits / log2 K."""
        return network.encode_features(features, self.levels(bits))

    def new_index(
        self,
        network: DPQModel,  # type: ignore[override]
        metadata: Mapping[str, Any] | None = None,
    ) -> DPQIndex:
        """A :class:`~dpq.index.DPQIndex` with the network's codebooks and assignment rule,
        searched as ``model.search_mode`` says; it holds full-length codes (every prefix is
        searched from them)."""
        from dpq.index import DPQIndex

        return DPQIndex(
            network.codebooks(),
            assignment=self.config.quantizer.assignment,
            metadata=metadata,
            search_mode=self.config.model.search_mode,  # type: ignore[arg-type]
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
        """AQD (or inner-product) search of float query features at the prefix of ``bits``."""
        return index.search(queries, k, num_levels=self.levels(bits))
