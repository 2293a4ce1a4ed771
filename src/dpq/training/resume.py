"""What a run is between epochs, what each epoch checkpoint records of it, and what a resume
restores (the checkpoint files themselves are :mod:`dpq.training.checkpoints`).

- :class:`RunState`: the epochs planned and done, the plan record, the history, the first
  epoch of the second phase.
- :func:`trainer_state`: the JSON-ready record saved with every epoch checkpoint (config,
  plan, history, training-set fingerprint, weight-average and gradient-scaler counters).
- :func:`resume_run`: a checkpoint checked against this run (the same config and the same
  training set, :func:`dataset_fingerprint`), loaded into the model, optimizers, weight
  average and gradient scaler, and the :class:`RunState` to continue from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpq.config import DPQConfig, config_differences
from dpq.training.checkpoints import CheckpointStore
from dpq.training.optim import WeightAverage

DATA_DERIVED_FIELDS = (
    "model.image_mean",
    "model.image_std",
    "model.num_classes",
    "model.multilabel",
    "model.backbone_kwargs.in_features",
)
"""Config fields filled from the training data (:func:`dpq.training.experiments.complete_config`)."""


@dataclass
class RunState:
    """The state of a run between epochs (what a checkpoint restores).

    Attributes:
        epochs: epochs planned (a time budget may change it after every epoch).
        plan: how ``epochs`` was chosen, for the log and the checkpoint.
        epoch: epochs done.
        history: one log record per epoch done.
        switch_epoch: first epoch (0-based) of the method's second phase (``epochs``: none).
        resumed_from: epochs done when this process started (0 for a fresh run).
        frozen_features: float32 (N, D) features of a frozen network, once computed.
    """

    epochs: int
    plan: dict[str, Any]
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    switch_epoch: int = 0
    resumed_from: int = 0
    frozen_features: np.ndarray | None = None


def dataset_fingerprint(inputs: Any, labels: np.ndarray) -> str:
    """Cheap identity of a training set: shapes, all labels and a sample of inputs."""
    digest = hashlib.sha256()
    digest.update(repr((tuple(inputs.shape), str(inputs.dtype), labels.shape)).encode())
    digest.update(np.ascontiguousarray(labels).tobytes())
    step = max(1, len(labels) // 64)
    digest.update(np.ascontiguousarray(inputs[::step]).tobytes())
    return digest.hexdigest()


def trainer_state(
    run: RunState,
    config: DPQConfig,
    fingerprint: str,
    ema: WeightAverage | None,
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
    """The JSON-ready trainer state written with every checkpoint."""
    return {
        "ema_updates": ema.updates if ema is not None else None,
        "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "config": config.to_dict(),
        "epochs": run.epochs,
        "plan": run.plan,
        "dataset_fingerprint": fingerprint,
        "epoch": run.epoch,
        "history": run.history,
    }


def check_resumable(
    path: Path, state: Mapping[str, Any], config: DPQConfig, fingerprint: str
) -> None:
    """ValueError unless the checkpoint at ``path`` (trainer state ``state``) was made with
    ``config`` on the training set of ``fingerprint``; the message says which differs."""
    saved = DPQConfig.from_dict(state["config"])
    if saved != config:
        diffs = config_differences(saved.to_dict(), config.to_dict())
        if all(diff.startswith(DATA_DERIVED_FIELDS) for diff in diffs):
            raise ValueError(
                f"cannot resume from {path}: it was trained on a different training set "
                "(the image statistics or classes taken from the data differ); resume with "
                "the same source, split and --split-seed."
            )
        raise ValueError(
            f"cannot resume from {path}: its config differs from this run's (saved vs "
            "now): "
            + "; ".join(diffs[:8])
            + ". Resume with the same settings, or start a new run in another --out."
        )
    if state["dataset_fingerprint"] != fingerprint:
        raise ValueError(
            f"cannot resume from {path}: it was trained on a different training set "
            "than the one given now (another source, split or --split-seed); resume with "
            "the same data and split."
        )


def resume_run(
    store: CheckpointStore,
    path: Path,
    config: DPQConfig,
    fingerprint: str,
    model: nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer],
    ema: WeightAverage | None,
    scaler: torch.amp.GradScaler,
    switch_epoch: Callable[[int], int],
) -> RunState:
    """Check the checkpoint at ``path`` against this run, load it in place into the model,
    optimizers, weight average and scaler, and return the run state to continue from
    (``switch_epoch(epochs)``: the method's second-phase start).

    Raises:
        FileNotFoundError: ``path`` is not on this machine.
        ValueError: another config or training set (:func:`check_resumable`).
    """
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} (the checkpoint rank 0 resumes from) is not on this machine; keep the "
            "run folder on storage every machine shares."
        )
    state = store.read_state(path)
    check_resumable(path, state, config, fingerprint)
    store.restore(path, model, optimizers, ema.state if ema else None)
    if ema is not None:
        ema.updates = int(state.get("ema_updates") or 0)
    if scaler.is_enabled() and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    epochs, epoch = int(state["epochs"]), int(state["epoch"])
    return RunState(
        epochs=epochs,
        plan=state["plan"],
        epoch=epoch,
        history=list(state["history"]),
        switch_epoch=switch_epoch(epochs),
        resumed_from=epoch,
    )
