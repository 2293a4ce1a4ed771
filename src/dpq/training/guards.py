"""What the loop refuses: a model built from another config (:func:`check_model_config`),
training data that cannot train the model (:func:`check_training_data`), and a run whose
loss or weights stop being finite (:class:`DivergenceGuard`: a
:class:`TrainingDiverged` naming the step, the likely cause and the last good checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from dpq.config import DPQConfig, config_differences
from dpq.methods.base import RetrievalMethod
from dpq.model.files import architecture
from dpq.model.retrieval_network import RetrievalNetwork


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the likely cause."""


def check_model_config(model: RetrievalNetwork, config: DPQConfig) -> None:
    """ValueError listing the differences unless ``model`` was built from the model,
    quantizer and method sections of ``config``."""
    if architecture(model.config) != architecture(config):
        diffs = config_differences(architecture(model.config), architecture(config))
        raise ValueError(
            "the model was built from another model/quantizer/method config than the one "
            f"given to the Trainer (model vs trainer): {'; '.join(diffs)}; build it from "
            "this config."
        )


def check_training_data(
    inputs: Any,
    labels: np.ndarray,
    network: RetrievalNetwork,
    config: DPQConfig,
    method: RetrievalMethod,
    world_size: int = 1,
) -> None:
    """ValueError (one sentence with the fix) unless the inputs and labels can train
    ``network`` with ``config`` in a run of ``world_size`` processes: one label per input,
    inputs the backbone reads, finite features, labels of the configured kind and range
    with every class present, enough items for the method, a batch that splits evenly.

    Args:
        inputs: uint8 (N, H, W, 3) images (or a reader) or float (N, F) features.
        labels: int64 (N,) class ids or multi-hot (N, C).
    """
    n = len(labels)
    if len(inputs) != n:
        raise ValueError(f"{len(inputs)} inputs but {n} labels; give one label per input.")
    network.check_inputs(inputs)
    if network.input_kind == "features" and not np.isfinite(inputs).all():
        raise ValueError("the training features contain NaN or inf; clean them first.")
    classes = config.model.num_classes
    if config.model.multilabel:
        if labels.ndim != 2 or labels.shape[1] != classes:
            raise ValueError(
                f"a multi-label model with {classes} labels needs multi-hot labels "
                f"(N, {classes}); got shape {labels.shape}."
            )
    else:
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"single-label training needs int class ids (N,); got {labels.dtype} "
                f"{labels.shape}. Set model.multilabel for multi-hot labels."
            )
        if n and (labels.min() < 0 or labels.max() >= classes):
            raise ValueError(
                f"labels must lie in [0, {classes}) for model.num_classes = {classes}; got "
                f"values in [{labels.min()}, {labels.max()}]."
            )
        present = len(np.unique(labels))
        if present < classes:
            raise ValueError(
                f"the training set holds {present} classes but the model (and its word "
                f"vectors) expect {classes}; every class needs training examples."
            )
    method.check_training_set(n)
    if n < 2:
        raise ValueError(f"training needs at least 2 items; got {n}.")
    if config.train.batch_size % world_size:
        raise ValueError(
            f"the batch size {config.train.batch_size} does not split evenly across "
            f"{world_size} processes; use a multiple of {world_size} (--batch-size is the "
            "global batch, shared by all processes)."
        )


class DivergenceGuard:
    """Stops a run whose loss or weights became NaN or infinite, with advice.

    Args:
        method: the method trained (its other learning rates and its hints on loss parts).
        precision: the arithmetic of the run ("fp32", "bf16", "fp16").
        last_checkpoint: returns the newest complete checkpoint, or None.
    """

    def __init__(
        self,
        method: RetrievalMethod,
        precision: str,
        last_checkpoint: Callable[[], Path | None],
    ) -> None:
        self.method = method
        self.precision = precision
        self.last_checkpoint = last_checkpoint

    def advice(self, lr: float, bad_terms: Iterable[str]) -> str:
        """The likely cause and what to do, for a network learning rate ``lr``."""
        rates = ", ".join(
            [f"network lr {lr:.3g}"]
            + [f"{name} lr {value:.3g}" for name, value in self.method.learning_rates().items()]
        )
        cause = (
            f"the learning rate is probably too high ({rates}): lower --lr or set train.grad_clip"
        )
        if self.precision != "fp32":
            cause += f", or train in fp32 (--precision fp32; this run used {self.precision})"
        cause += self.method.divergence_hint(bad_terms)
        last = self.last_checkpoint()
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return f"{cause}. Training stopped; {kept}, and nothing was overwritten."

    def check_loss(self, parts: dict[str, float], epoch: int, step: int, lr: float) -> None:
        """TrainingDiverged when the step's total loss is not finite (0-based epoch, step)."""
        if math.isfinite(parts["total"]):
            return
        bad = [name for name, value in parts.items() if not math.isfinite(value)]
        raise TrainingDiverged(
            f"loss became {parts['total']} at epoch {epoch + 1}, step {step + 1} "
            f"(non-finite terms: {', '.join(bad)}); {self.advice(lr, bad)}"
        )

    def check_weights(self, model: nn.Module, epoch: int, lr: float) -> None:
        """Refuse to checkpoint non-finite weights (a step can break them without the loss
        of that step showing it)."""
        broken = [name for name, p in model.named_parameters() if not p.isfinite().all()]
        if broken:
            raise TrainingDiverged(
                f"weights became NaN or infinite during epoch {epoch + 1} (e.g. {broken[0]}); "
                + self.advice(lr, [])
            )
