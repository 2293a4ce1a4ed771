"""The training loop of a DPQ model, read as a loop over phases and epochs.

:class:`Trainer` trains a :class:`~dpq.model.network.DPQModel` on labelled inputs (uint8 images
(N, H, W, 3), or float32 features (N, F) for the identity backbone) with the losses of
:class:`~dpq.methods.losses.DPQLoss`, following ``config.train.schedule``:

- "end_to_end" (the paper): before ``quantization_start`` the network learns with
  L_S + lambda L_C; from then on with L_S + lambda L_C + tau E, E reaching the network.
- "two_phase" (reference code): the same phases, but E is computed on detached features, so
  it trains the codebooks only while L_S + lambda L_C keep training the network. (The
  reference alternates a network step and a codebook step; with detached features one
  backward pass gives both steps on the same batch.)
- "two_step" (Table 2): the network learns with L_S + lambda L_C, is then frozen, and the
  codebooks alone learn E on its features.

When the quantization phase starts, the codebooks are initialised by residual k-means on the
training features (``quantizer.init == "kmeans"``). The network has its own optimizer and
learning-rate schedule; the codebooks always use Adam at ``train.codebook_lr``.

Batches are read by a :class:`dpq.data.loading.BatchReader`: indexed in this process for
in-memory arrays, decoded by DataLoader worker processes for an on-demand image reader
(``workers``), with the same batches either way: the epoch order and every augmentation
are drawn here from ``np.random.default_rng([seed, epoch])``. The model trains on
``device`` (any of :func:`dpq.devices.resolve_device`); float16 autocast trains with a
gradient scaler (:func:`dpq.devices.gradient_scaler`). Pretrained backbone weights
(``train.backbone_weights``) are loaded when a fresh run starts; the backbone then learns
at ``lr * train.backbone_lr_scale`` and its first ``train.freeze_stages`` stages not at all.

Every epoch ends with a checkpoint (:class:`dpq.training.checkpoints.CheckpointStore`), so
``train(resume=True)`` continues from the newest one after the process was killed, with
bit-identical results. The run folder is locked for the whole run
(:class:`dpq.training.checkpoints.RunDirectory`). The final model goes to ``out_dir/model/``.

With a time budget (:class:`dpq.training.budget.TimeBudget`), a few steps are first timed on a copy
of the model (the copy is thrown away), the epochs that fit are planned, and the plan is
revised after every epoch.

Under ``torchrun`` (``WORLD_SIZE > 1``) the same loop runs in every process with
DistributedDataParallel (:mod:`dpq.training.ddp`): each step's global batch of
``train.batch_size`` items is split across the ranks, every gradient (codebooks included) is
all-reduced, the logged losses are means over the ranks, k-means runs on rank 0 over the
features of all ranks and its codebooks are broadcast, BatchNorm statistics are averaged
after every epoch (and the ranks checked to hold the same model), and rank 0 alone takes the
run lock, decides the time plan and the checkpoint to resume from, and writes checkpoints,
the log and the final model.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from dpq.config import DPQConfig, config_differences
from dpq.data.loading import BatchReader
from dpq.devices import (
    autocast,
    available_cores,
    describe_device,
    full_precision,
    gradient_scaler,
    resolve_device,
    resolve_precision,
)
from dpq.methods.losses import DPQLoss, LossOutput
from dpq.model.backbones import load_backbone_weights
from dpq.model.files import architecture
from dpq.model.network import DPQModel
from dpq.progress import is_terminal, progress_bar
from dpq.training import ddp
from dpq.training.augment import crop_flip, cutout, mixup, rand_augment
from dpq.training.budget import TimeBudget
from dpq.training.checkpoints import RunDirectory, RunInProgressError
from dpq.training.ddp import DistributedContext

DATA_DERIVED_FIELDS = (
    "model.image_mean",
    "model.image_std",
    "model.num_classes",
    "model.multilabel",
    "model.backbone_kwargs.in_features",
)
"""Config fields filled from the training data (:func:`dpq.training.experiments.complete_config`)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the likely cause."""


class LabelledInputs(Protocol):
    """Anything with ``images`` (uint8 (N, H, W, 3) or float (N, F): an array, or an
    on-demand reader such as :class:`dpq.data.ImageFileReader`) and ``labels``."""

    images: Any
    labels: np.ndarray


@dataclass(frozen=True)
class ArrayDataset:
    """Inputs and labels held in memory.

    Attributes:
        images: uint8 (N, H, W, 3) images, or float32 (N, F) features (or an on-demand
            image reader with the same indexing, read through worker processes).
        labels: int64 (N,) class ids or multi-hot (N, C).
    """

    images: Any
    labels: np.ndarray


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns.

    Attributes:
        model: the trained model (eval mode; EMA weights when EMA was on).
        epochs: number of epochs of the run.
        history: one dict per epoch (mean loss parts, learning rate, seconds, accuracy).
        wall_seconds: wall time of this call.
        model_dir: directory of the saved final model.
        resumed_from_epoch: epochs already done when this call started (0 for a fresh run).
        planned: how the epoch count was chosen (time-budget measurements), for the log.
        precision: the arithmetic the network trained in ("fp32", "bf16", "fp16").
        rank, world_size: this process in a multi-process run (0 and 1 otherwise); rank 0
            wrote the checkpoints and the model.
    """

    model: DPQModel
    epochs: int
    history: list[dict[str, Any]]
    wall_seconds: float
    model_dir: Path
    resumed_from_epoch: int = 0
    planned: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True in a single process and on rank 0 (the process that wrote the run)."""
        return self.rank == 0


def seed_everything(seed: int) -> None:
    """Seed Python and torch (call before building the model for a reproducible init).

    dpq itself draws numpy randomness from explicitly seeded generators only."""
    random.seed(seed)
    torch.manual_seed(seed)


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


class WeightAverage:
    """Exponential moving average of a model's floating-point state (weights and BatchNorm
    statistics); integer buffers are copied. Decay warms up as min(decay, (1+n)/(10+n))."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, value in model.state_dict().items():
            average = self.state[name]
            if average.dtype.is_floating_point:
                average.mul_(decay).add_(value.detach(), alpha=1 - decay)
            else:
                average.copy_(value)

    @torch.no_grad()
    def reset(self, model: nn.Module, prefix: str) -> None:
        """Copy the current values of the entries whose name starts with ``prefix``."""
        for name, value in model.state_dict().items():
            if name.startswith(prefix):
                self.state[name].copy_(value)


def dataset_fingerprint(inputs: Any, labels: np.ndarray) -> str:
    """Cheap identity of a training set: shapes, all labels and a sample of inputs."""
    digest = hashlib.sha256()
    digest.update(repr((tuple(inputs.shape), str(inputs.dtype), labels.shape)).encode())
    digest.update(np.ascontiguousarray(labels).tobytes())
    step = max(1, len(labels) // 64)
    digest.update(np.ascontiguousarray(inputs[::step]).tobytes())
    return digest.hexdigest()


def _running_losses(sums: dict[str, float], steps: int) -> str:
    """Running means of the main loss terms, for progress output."""
    shown = [("total", "loss"), ("semantic", "L_S"), ("cls", "L_C"), ("E", "E")]
    return ", ".join(f"{label} {sums[key] / steps:.3g}" for key, label in shown if key in sums)


def model_and_loss(
    model: DPQModel,
    loss_fn: DPQLoss,
    precision: str,
    x: torch.Tensor,
    targets: torch.Tensor,
    quantize: bool,
    detach: bool,
) -> tuple[LossOutput, torch.Tensor]:
    """One training forward pass: (the loss of the batch, the logits (B, C))."""
    with autocast(model.device, precision):
        out = model(x, quantize=quantize, detach_quantizer_input=detach)
    loss = loss_fn(out.semantic, out.logits.float(), targets, out.quantized, out.quantizer_input)
    return loss, out.logits


class _ModelAndLoss(nn.Module):
    """:func:`model_and_loss` as a module, for DistributedDataParallel: it returns the loss
    tensor, the logits detached and the float parts, so DDP finds the used parameters by
    following the graph of the loss alone."""

    def __init__(self, model: DPQModel, loss_fn: DPQLoss, precision: str) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.precision = precision

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor, quantize: bool, detach: bool
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        loss, logits = model_and_loss(
            self.model, self.loss_fn, self.precision, x, targets, quantize, detach
        )
        return loss.total, logits.detach(), loss.parts


@dataclass
class _Run:
    """The state of a run between epochs (what a checkpoint restores)."""

    epochs: int
    plan: dict[str, Any]
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    quant_epoch: int = 0
    resumed_from: int = 0
    frozen_features: np.ndarray | None = None


class Trainer:
    """Train a DPQ model; see the module docstring for the schedules.

    Args:
        config: the full configuration (its model/quantizer sections must be the model's);
            it is saved with every checkpoint.
        model: the network to train (built from ``config``).
        dataset: labelled training inputs (``.images``, ``.labels``), e.g.
            :class:`ArrayDataset`.
        word_vectors: float (C, D) label word vectors (needed by the semantic loss).
        out_dir: where checkpoints, the log and the final model go (a path or a
            :class:`~dpq.training.checkpoints.RunDirectory`).
        progress: show progress (a bar on a terminal, one line per epoch elsewhere).
        log: function receiving one-line messages (default: print to stderr).
        clock: seconds as a float (default ``time.perf_counter``; tests inject a fake one).
        device: where to train ("auto", "cpu", "cuda", "cuda:N", "mps", a torch.device);
            None: where the model is. The model is moved there.
        workers: data-loading processes for an on-demand image reader (None: one per core,
            up to 8); in-memory arrays are always read in this process.
        distributed: the multi-process run this process belongs to; "auto" (the default)
            joins the one torchrun describes (:func:`dpq.training.ddp.init_from_environment`),
            None trains alone. On CUDA each rank trains on its ``LOCAL_RANK`` GPU.
    """

    def __init__(
        self,
        config: DPQConfig,
        model: DPQModel,
        dataset: LabelledInputs,
        word_vectors: np.ndarray | None,
        out_dir: str | Path | RunDirectory,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        device: str | torch.device | None = None,
        workers: int | None = None,
        distributed: DistributedContext | None | str = "auto",
    ) -> None:
        if architecture(model.config) != architecture(config):
            diffs = config_differences(architecture(model.config), architecture(config))
            raise ValueError(
                "the model was built from another model/quantizer config than the one given to "
                f"the Trainer (model vs trainer): {'; '.join(diffs)}; build it from this config."
            )
        self.config = config
        target = resolve_device(device) if device is not None else model.device
        if distributed == "auto":
            distributed = ddp.init_from_environment(target.type)
        self.dist: DistributedContext | None = distributed  # type: ignore[assignment]
        self.is_main = self.dist is None or self.dist.is_main
        if self.dist is not None:
            target = self.dist.device_for(target)
        if device is not None or target != model.device:
            model.to(target)
        self.model = model
        self._net: nn.Module | None = None  # the DistributedDataParallel wrapper, when training
        if config.train.channels_last:
            model.set_channels_last(True)
        if config.train.freeze_stages:
            model.freeze_backbone_stages(config.train.freeze_stages)
        self.device = model.device
        self.workers = workers
        self.inputs = dataset.images
        self.labels = np.asarray(dataset.labels)
        self._check_dataset()
        self.loss_fn = DPQLoss(
            config.loss,
            word_vectors,
            num_classes=config.model.num_classes,
            num_levels=config.quantizer.num_levels,
            dim=config.quantizer.dim,
            multilabel=config.model.multilabel,
        ).to(self.device)
        self.run_dir = out_dir if isinstance(out_dir, RunDirectory) else RunDirectory(out_dir)
        self.checkpoints = self.run_dir.checkpoints
        self.checkpoints.keep = config.train.keep_checkpoints
        self.progress = progress and self.is_main
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        if not self.is_main:
            self.log = lambda message: None
        self.clock = clock
        self.fingerprint = dataset_fingerprint(self.inputs, self.labels)
        self.precision = resolve_precision(config.train.precision, self.device)
        self.scaler = gradient_scaler(self.device, self.precision)
        self.reader = BatchReader(self.inputs, workers=workers, device=self.device)

    @property
    def out_dir(self) -> Path:
        return self.run_dir.path

    # -------------------------------------------------------------- checks

    def _check_dataset(self) -> None:
        cfg = self.config
        n = len(self.labels)
        if len(self.inputs) != n:
            raise ValueError(f"{len(self.inputs)} inputs but {n} labels; give one label per input.")
        self.model.check_inputs(self.inputs)
        if self.model.input_kind == "features" and not np.isfinite(self.inputs).all():
            raise ValueError("the training features contain NaN or inf; clean them first.")
        classes = cfg.model.num_classes
        if cfg.model.multilabel:
            if self.labels.ndim != 2 or self.labels.shape[1] != classes:
                raise ValueError(
                    f"a multi-label model with {classes} labels needs multi-hot labels "
                    f"(N, {classes}); got shape {self.labels.shape}."
                )
        else:
            if self.labels.ndim != 1 or not np.issubdtype(self.labels.dtype, np.integer):
                raise ValueError(
                    f"single-label training needs int class ids (N,); got {self.labels.dtype} "
                    f"{self.labels.shape}. Set model.multilabel for multi-hot labels."
                )
            if n and (self.labels.min() < 0 or self.labels.max() >= classes):
                raise ValueError(
                    f"labels must lie in [0, {classes}) for model.num_classes = {classes}; got "
                    f"values in [{self.labels.min()}, {self.labels.max()}]."
                )
            present = len(np.unique(self.labels))
            if present < classes:
                raise ValueError(
                    f"the training set holds {present} classes but the model (and its word "
                    f"vectors) expect {classes}; every class needs training examples."
                )
        if cfg.quantizer.init == "kmeans" and n < cfg.quantizer.codebook_size:
            raise ValueError(
                f"k-means initialisation needs at least K = {cfg.quantizer.codebook_size} "
                f"training items; got {n}. Use a smaller codebook (--codebook-size), more "
                "training items, or the normal initialisation "
                '(--config FILE with {"quantizer": {"init": "normal"}}).'
            )
        if n < 2:
            raise ValueError(f"training needs at least 2 items; got {n}.")
        world = self.dist.world_size if self.dist is not None else 1
        if cfg.train.batch_size % world:
            raise ValueError(
                f"the batch size {cfg.train.batch_size} does not split evenly across {world} "
                f"processes; use a multiple of {world} (--batch-size is the global batch, "
                "shared by all processes)."
            )

    # -------------------------------------------------------------- plan

    def steps_per_epoch(self) -> int:
        """Batches per epoch (the last incomplete batch is dropped when there is a full one)."""
        return max(1, len(self.labels) // self.config.train.batch_size)

    def quantization_start_epoch(self, epochs: int) -> int:
        """First epoch (0-based) of the quantization phase."""
        if not self.config.loss.uses_quantization:
            return epochs
        start = math.floor(self.config.train.quantization_start * epochs + 1e-9)
        if self.config.train.schedule == "two_step":
            return min(max(start, 1), epochs - 1) if epochs > 1 else 0
        return min(start, epochs - 1)

    def _network_steps(self, run: _Run) -> int:
        """Steps of the network's learning-rate schedule (two-step: the first step only)."""
        network_epochs = run.quant_epoch if self.config.train.schedule == "two_step" else run.epochs
        return network_epochs * self.steps_per_epoch()

    # -------------------------------------------------------------- optimisers

    def _network_parameters(self) -> list[dict[str, Any]]:
        """Parameter groups of the network optimizer: weights with weight decay, biases and
        BatchNorm without; the backbone's at ``lr_scale = train.backbone_lr_scale``, the new
        layers' at 1. Frozen parameters are left out."""
        cfg = self.config.train
        groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            if name == "quantizer.codebooks" or not param.requires_grad:
                continue
            scale = cfg.backbone_lr_scale if name.startswith("backbone.") else 1.0
            groups.setdefault((scale, param.ndim > 1), []).append(param)
        order = sorted(groups, key=lambda key: (-key[0], not key[1]))
        return [
            {
                "params": groups[key],
                "weight_decay": cfg.weight_decay if key[1] else 0.0,
                "lr_scale": key[0],
            }
            for key in order
        ]

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        cfg = self.config.train
        groups = self._network_parameters()
        if cfg.optimizer == "sgd":
            network = torch.optim.SGD(
                groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0
            )
        elif cfg.optimizer == "adam":
            network = torch.optim.Adam(groups, lr=cfg.lr)
        else:
            network = torch.optim.AdamW(groups, lr=cfg.lr)
        return {"network": network, "codebooks": self._codebook_optimizer()}

    def _codebook_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.model.quantizer.codebooks], lr=self.config.train.codebook_lr)

    # -------------------------------------------------------------- batches

    def _targets(self, index: np.ndarray) -> torch.Tensor:
        labels = torch.from_numpy(np.ascontiguousarray(self.labels[index])).to(self.device)
        return labels.float() if self.config.model.multilabel else labels.long()

    def _batch(
        self, raw: torch.Tensor, index: np.ndarray, rng: np.random.Generator, augment: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared network inputs and targets (int64 ids or float (B, C)) of one batch.

        Args:
            raw: the batch's raw inputs (uint8 (B, H, W, 3) or float (B, F)), on any device.
            index: int64 (B,) their rows (for the labels).
            rng: the epoch's generator (augmentations).
        """
        cfg = self.config.train
        raw = raw.to(self.device, non_blocking=True)
        targets = self._targets(index)
        images = self.model.input_kind == "images"
        if augment and images:
            raw = crop_flip(raw, rng, cfg.crop_pad, cfg.flip)
            if cfg.randaugment_ops > 0:
                raw = rand_augment(raw, rng, cfg.randaugment_ops, cfg.randaugment_magnitude)
        x = self.model.prepare_inputs(raw)
        if augment and images and cfg.cutout > 0:
            x = cutout(x, rng, cfg.cutout)
        if augment and cfg.mixup_alpha > 0:
            one_hot = torch.nn.functional.one_hot(targets, self.config.model.num_classes).float()
            x, targets = mixup(x, one_hot, rng, cfg.mixup_alpha)
            if self.model.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        return x, targets

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.random.Generator]:
        """The epoch's index batches int64 (steps, B) and its augmentation generator; in a
        multi-process run this rank's share (steps, B / N) of the same global batches, with
        augmentations of its own."""
        rng = np.random.default_rng([self.config.train.seed, epoch])
        order = rng.permutation(len(self.labels))
        steps = self.steps_per_epoch()
        size = min(self.config.train.batch_size, len(order))
        order = order[: steps * size].reshape(steps, size)
        if self.dist is not None:
            order = ddp.rank_batches(order, self.dist)
            rng = np.random.default_rng([self.config.train.seed, epoch, 1 + self.dist.rank])
        return order, rng

    # -------------------------------------------------------------- one step

    def _forward_loss(
        self, x: torch.Tensor, targets: torch.Tensor, quantize: bool, detach: bool
    ) -> tuple[LossOutput, torch.Tensor]:
        if self._net is not None:  # DistributedDataParallel around _ModelAndLoss
            total, logits, parts = self._net(x, targets, quantize=quantize, detach=detach)
            return LossOutput(total, parts), logits
        return model_and_loss(
            self.model, self.loss_fn, self.precision, x, targets, quantize, detach
        )

    def _agreed(self, loss: LossOutput) -> LossOutput:
        """The loss with its logged parts averaged over the ranks (the global batch's means,
        so every rank sees the same values and stops together on a non-finite one)."""
        if self.dist is None:
            return loss
        return LossOutput(loss.total, ddp.mean_over_ranks(loss.parts, self.dist))

    def _check_finite(self, loss: LossOutput, epoch: int, step: int, lr: float) -> None:
        if math.isfinite(loss.parts["total"]):
            return
        bad = [name for name, value in loss.parts.items() if not math.isfinite(value)]
        raise TrainingDiverged(
            f"loss became {loss.parts['total']} at epoch {epoch + 1}, step {step + 1} "
            f"(non-finite terms: {', '.join(bad)}); {self._divergence_advice(lr, bad)}"
        )

    def _divergence_advice(self, lr: float, bad_terms: list[str]) -> str:
        cfg = self.config.train
        cause = (
            f"the learning rate is probably too high (network lr {lr:.3g}, codebook lr "
            f"{cfg.codebook_lr:.3g}): lower --lr or set train.grad_clip"
        )
        if self.precision != "fp32":
            cause += f", or train in fp32 (--precision fp32; this run used {self.precision})"
        if {"E", "quan", "quan_hard", "match"} & set(bad_terms):
            cause += "; the quantization loss is non-finite, so also try a smaller --tau"
        last = self.checkpoints.latest()
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return f"{cause}. Training stopped; {kept}, and nothing was overwritten."

    def _check_weights(self, epoch: int) -> None:
        """Refuse to checkpoint non-finite weights (a step can break them without the loss
        of that step showing it)."""
        broken = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if broken:
            raise TrainingDiverged(
                f"weights became NaN or infinite during epoch {epoch + 1} (e.g. {broken[0]}); "
                + self._divergence_advice(self.config.train.lr, [])
            )

    # -------------------------------------------------------------- k-means

    def _training_features(self) -> np.ndarray:
        """Eval-mode features of the (unaugmented) training set: float32 (N, D) (in a
        multi-process run each rank computes its share and all ranks get all of them)."""
        if self.dist is not None:
            return self._gathered(self._rank_training_features)
        return self.model.extract_features(
            self.inputs,
            batch_size=max(256, self.config.train.batch_size),
            tta_flip=False,
            workers=self.workers,
        )

    def _rank_training_features(self, rows: np.ndarray) -> np.ndarray:
        subset = getattr(self.inputs, "subset", None)
        inputs = subset(rows) if callable(subset) else self.inputs[rows]
        return self.model.extract_features(
            inputs,
            batch_size=max(256, self.config.train.batch_size),
            tta_flip=False,
            workers=self.workers,
        )

    def _gathered(self, features_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """float32 (N, D) features of every training row, computed by the ranks in turns of
        rows (``features_of(rows)`` on this rank's share) and gathered on all ranks."""
        assert self.dist is not None
        rows = ddp.rank_rows(len(self.labels), self.dist)
        local = features_of(rows)
        every_row = ddp.all_gather_rows(rows, self.dist, "gathering the k-means features")
        gathered = ddp.all_gather_rows(local, self.dist, "gathering the k-means features")
        out = np.empty_like(gathered)
        out[every_row] = gathered
        return out

    @torch.no_grad()
    def _features_as_trained(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Features of the unaugmented training set (or of ``rows``) as the training loss
        sees them (BatchNorm on batch statistics), float32 (N, D); BatchNorm running
        statistics are left as they were. Early in training the running statistics are far
        from the batch statistics, so eval-mode features would put the codebooks where the
        training features are not."""
        if rows is None and self.dist is not None:
            return self._gathered(self._features_as_trained)
        model = self.model
        saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
        was_training = model.training
        model.train()
        batch_size = max(256, self.config.train.batch_size)
        count = len(self.labels) if rows is None else len(rows)
        out = np.empty((count, self.config.quantizer.dim), dtype=np.float32)
        if rows is None:
            batches = self.reader.sequential(batch_size)
        else:
            parts = [rows[start : start + batch_size] for start in range(0, count, batch_size)]
            starts = range(0, count, batch_size)
            batches = zip(starts, self.reader.read(parts), strict=True)
        try:
            with autocast(self.device, self.precision):
                for start, raw in batches:
                    x = model.prepare_inputs(raw.to(self.device, non_blocking=True))
                    features = model(x, quantize=False).features.float().cpu().numpy()
                    out[start : start + len(features)] = features
        finally:
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])
            model.train(was_training)
        return out

    def _kmeans_init(self, eval_mode: bool = False) -> np.ndarray:
        """Residual k-means codebooks on the training features; in a multi-process run on
        rank 0, over the features of all ranks, then broadcast: every rank starts from the
        same codebooks."""
        features = self._training_features() if eval_mode else self._features_as_trained()
        quantizer = self.model.quantizer

        def kmeans() -> list[float]:
            return quantizer.init_kmeans(
                features,
                iterations=self.config.train.kmeans_iterations,
                seed=self.config.train.seed,
            ).tolist()

        errors = ddp.rank0_decides(self.dist, kmeans, "k-means on rank 0")
        if self.dist is not None:
            ddp.broadcast_tensors_([quantizer.codebooks], self.dist, "broadcasting the codebooks")
        self.log(
            "k-means codebook init on "
            f"{len(features)} training features: mean squared error per level "
            + " ".join(f"{e:.4g}" for e in errors)
        )
        return np.asarray(errors)

    # -------------------------------------------------------------- time budget

    def _time_steps(self, max_steps: int = 12, warmup_steps: int = 2) -> float:
        """Seconds per training step, measured on a throw-away copy of model and optimizers."""
        original = self.model
        rng_state = torch.get_rng_state()
        self.model = copy.deepcopy(original)
        try:
            optimizers = self._make_optimizers()
            self.model.train()
            order, rng = self._epoch_order(10**6)
            steps = min(len(order), max_steps + warmup_steps)
            quantize = self.config.loss.uses_quantization
            scaler = gradient_scaler(self.device, self.precision)
            times = []
            batches = self.reader.read(order[step % len(order)] for step in range(steps))
            begin = self.clock()
            for step, raw in enumerate(batches):
                x, targets = self._batch(raw, order[step % len(order)], rng, augment=True)
                loss, _ = self._forward_loss(x, targets, quantize, detach=False)
                for optimizer in optimizers.values():
                    optimizer.zero_grad(set_to_none=True)
                if loss.total.requires_grad:
                    scaler.scale(loss.total).backward()
                for optimizer in optimizers.values():
                    scaler.step(optimizer)
                scaler.update()
                times.append(self.clock() - begin)
                begin = self.clock()
            measured = times[warmup_steps:] or times
            return float(np.median(measured)) * 1.05
        finally:
            self.model = original
            torch.set_rng_state(rng_state)

    def _plan_epochs(self, budget: TimeBudget | None) -> tuple[int, dict[str, Any]]:
        """The first plan; in a multi-process run rank 0 times its steps and decides."""
        cfg = self.config.train
        if budget is None:
            return cfg.epochs, {"epochs": cfg.epochs, "source": "config"}
        epochs, plan = ddp.rank0_decides(
            self.dist, lambda: self._measured_plan(budget), "the time plan"
        )
        return int(epochs), plan

    def _measured_plan(self, budget: TimeBudget) -> tuple[int, dict[str, Any]]:
        cfg = self.config.train
        seconds_per_step = self._time_steps()
        epochs, plan = budget.plan(seconds_per_step)
        self.log(
            f"time budget {cfg.time_budget_minutes:g} min: {seconds_per_step:.3f} s/step x "
            f"{plan['steps_per_epoch']} steps = {plan['seconds_per_epoch']:.1f} s/epoch -> "
            f"{epochs} epochs"
        )
        return epochs, plan

    def _revise_plan(self, run: _Run, budget: TimeBudget, epoch_wall: float, record: dict) -> None:
        """After an epoch: change ``run.epochs`` when the budget says so (and what follows)."""
        done = run.epoch
        warming_up = (
            done < self.config.train.warmup_fraction * run.epochs and done < run.quant_epoch
        )
        revised = budget.revise(epoch_wall, run.epochs, done, warming_up)
        if self.config.loss.uses_quantization and run.quant_epoch >= done:
            revised = max(revised, done + 1)  # one quantization epoch at least
        if revised == run.epochs:
            return
        self.log(
            f"after epoch {done} ({record['seconds']:.1f} s; planned "
            f"{run.plan['seconds_per_epoch']:.1f} s): {revised} epochs instead of {run.epochs} "
            "to " + ("stay within" if revised < run.epochs else "use") + " the time budget"
        )
        run.epochs = revised
        run.plan = {**run.plan, "epochs": revised, "replanned_after_epoch": done}
        # quantization that has started goes on; one that has not cannot start before the
        # next epoch
        if run.quant_epoch >= done:
            run.quant_epoch = max(self.quantization_start_epoch(revised), done)
            if self.config.loss.uses_quantization:
                run.quant_epoch = min(run.quant_epoch, revised - 1)

    def _agree_on_plan(
        self, run: _Run, budget: TimeBudget, epoch_wall: float, record: dict
    ) -> None:
        """:meth:`_revise_plan`, decided by rank 0 in a multi-process run (its wall time
        and budget), the result applied on every rank."""

        def revise() -> dict[str, Any]:
            self._revise_plan(run, budget, epoch_wall, record)
            return {"epochs": run.epochs, "plan": run.plan, "quant_epoch": run.quant_epoch}

        decided = ddp.rank0_decides(self.dist, revise, "revising the time plan")
        run.epochs, run.plan = int(decided["epochs"]), decided["plan"]
        run.quant_epoch = int(decided["quant_epoch"])

    # -------------------------------------------------------------- the loop

    def train(self, resume: bool = False) -> TrainResult:
        """Run (or continue) the training and save the final model to ``out_dir/model``.

        Args:
            resume: continue from the newest checkpoint in ``out_dir`` (the config and the
                training set must be the same as in the interrupted run).

        Raises:
            ValueError: ``out_dir`` already holds a run and ``resume`` is false; no
                checkpoint to resume from; a config or data mismatch on resume.
            dpq.training.checkpoints.RunInProgressError: another process is training into ``out_dir``.
            TrainingDiverged: the loss became NaN/inf (the last good checkpoint is kept).
        """
        with contextlib.ExitStack() as stack:

            def claim_folder() -> bool:
                stack.enter_context(self.run_dir.lock())
                self.run_dir.check_can_start(resume)
                self.checkpoints.remove_temporaries()
                return True

            ddp.rank0_decides(
                self.dist,
                claim_folder,
                "checking the run folder",
                kinds=(RunInProgressError, ValueError, FileNotFoundError),
            )
            try:
                return self._train_locked(resume)
            finally:
                self.reader.close()
                self._net = None

    def _wrap(self) -> None:
        """DistributedDataParallel around the model and its loss (its constructor makes
        every rank start from rank 0's weights). It follows the graph from the loss, so a
        parameter a phase leaves out (the codebooks before the quantization phase, a head
        whose loss is off) counts as unused instead of being waited for. Buffers are not
        broadcast every step (that would discard the other ranks' BatchNorm statistics);
        they are averaged per epoch."""
        if self.dist is None:
            return
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # buffers synced from rank 0 once, at the start, not before every forward pass
        options = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False}  # torch before forward_sync_buffers
        )
        with ddp.collective_guard(self.dist, "starting DistributedDataParallel"):
            self._net = DistributedDataParallel(
                _ModelAndLoss(self.model, self.loss_fn, self.precision),
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
                **options,
            )

    def _end_epoch_in_sync(self, ema: WeightAverage | None, record: dict[str, Any]) -> None:
        """Average BatchNorm statistics (and their EMA) over the ranks, then check that
        every rank holds the same model; the model's digest goes into the epoch record."""
        if self.dist is None:
            return
        ddp.average_buffers_(self.model, self.dist)
        if ema is not None:
            buffers = {name for name, _ in self.model.named_buffers()}
            averaged = [v for k, v in ema.state.items() if k in buffers and v.is_floating_point()]
            ddp.all_reduce_mean_(averaged, self.dist, "averaging the EMA's BatchNorm")
        record["state_sha256"] = ddp.check_in_sync(
            self.model, self.dist, f"after epoch {record['epoch']}"
        )

    def _train_locked(self, resume: bool) -> TrainResult:
        started = self.clock()
        cfg = self.config.train
        torch.set_num_threads(cfg.num_threads or available_cores())
        if cfg.backbone_weights is not None and not resume:
            loaded = load_backbone_weights(self.model.backbone, cfg.backbone_weights)
            self.log(
                f"backbone weights from {cfg.backbone_weights}: {loaded['loaded']} tensors"
                + (
                    f" ({loaded['ignored']} classifier tensors left out)"
                    if loaded["ignored"]
                    else ""
                )
            )
        optimizers = self._make_optimizers()
        ema = WeightAverage(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        budget = None
        if cfg.time_budget_minutes is not None:
            budget = TimeBudget(
                cfg.time_budget_minutes, self.steps_per_epoch(), self.clock, started
            )
        if resume:
            run = self._resume(optimizers, ema)
        else:
            epochs, plan = self._plan_epochs(budget)
            run = _Run(epochs=epochs, plan=plan, quant_epoch=self.quantization_start_epoch(epochs))
        self._wrap()
        if self.dist is not None:
            per_rank = self.config.train.batch_size // self.dist.world_size
            self.log(
                f"DistributedDataParallel: {self.dist.world_size} processes ({self.dist.backend}), "
                f"global batch {self.config.train.batch_size} = {per_rank} per process"
            )
        if self.precision != "fp32" or self.device.type != "cpu":
            arithmetic = "float32" if self.precision == "fp32" else f"{self.precision} autocast"
            scaled = " with a gradient scaler" if self.scaler.is_enabled() else ""
            self.log(f"training on {describe_device(self.device)} in {arithmetic}{scaled}")
        if self.reader.streams:
            self.log(
                f"reading {len(self.labels):,} training images on demand with "
                f"{self.reader.workers} worker process(es)"
            )
        steps = self.steps_per_epoch()
        bar = None
        if self.progress and is_terminal():
            bar = progress_bar(
                run.epochs * steps, "train", "step", initial=run.epoch * steps, leave=True
            )
        try:
            while run.epoch < run.epochs:
                epoch_start = self.clock()
                if run.epoch == run.quant_epoch:
                    optimizers["codebooks"] = self._start_quantization(ema)
                record = self._run_epoch(run, optimizers, ema, bar)
                self._end_epoch_in_sync(ema, record)
                record["seconds"] = round(self.clock() - epoch_start, 3)
                self._check_weights(run.epoch)
                run.history.append(record)
                run.epoch += 1
                if self.is_main:
                    self.run_dir.append_log(record)
                    self.checkpoints.save(
                        run.epoch,
                        self.model,
                        self.config,
                        self._state(run, ema),
                        optimizers,
                        ema.state if ema is not None else None,
                    )
                if self.progress and bar is None:
                    self.log(self._epoch_line(run, record))
                if budget is not None and run.resumed_from == 0 and run.epoch < run.epochs:
                    self._agree_on_plan(run, budget, self.clock() - epoch_start, record)
                    if bar is not None:
                        bar.total = run.epochs * steps
                        bar.refresh()
        finally:
            if bar is not None:
                bar.close()
        return self._finish(run, ema, started)

    def _state(self, run: _Run, ema: WeightAverage | None) -> dict[str, Any]:
        """The JSON-ready trainer state written with every checkpoint."""
        return {
            "ema_updates": ema.updates if ema is not None else None,
            "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "config": self.config.to_dict(),
            "epochs": run.epochs,
            "plan": run.plan,
            "dataset_fingerprint": self.fingerprint,
            "epoch": run.epoch,
            "history": run.history,
        }

    def _resume(
        self, optimizers: dict[str, torch.optim.Optimizer], ema: WeightAverage | None
    ) -> _Run:
        latest = ddp.rank0_decides(
            self.dist, lambda: str(self.checkpoints.latest()), "choosing the checkpoint"
        )
        path = Path(latest)  # check_can_start guarantees there is one
        if not path.is_dir():
            raise FileNotFoundError(
                f"{path} (the checkpoint rank 0 resumes from) is not on this machine; keep the "
                "run folder on storage every machine shares."
            )
        state = self.checkpoints.read_state(path)
        saved = DPQConfig.from_dict(state["config"])
        if saved != self.config:
            diffs = config_differences(saved.to_dict(), self.config.to_dict())
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
        if state["dataset_fingerprint"] != self.fingerprint:
            raise ValueError(
                f"cannot resume from {path}: it was trained on a different training set "
                "than the one given now (another source, split or --split-seed); resume with "
                "the same data and split."
            )
        self.checkpoints.restore(path, self.model, optimizers, ema.state if ema else None)
        if ema is not None:
            ema.updates = int(state.get("ema_updates") or 0)
        if self.scaler.is_enabled() and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        epochs, epoch = int(state["epochs"]), int(state["epoch"])
        run = _Run(
            epochs=epochs,
            plan=state["plan"],
            epoch=epoch,
            history=list(state["history"]),
            quant_epoch=self.quantization_start_epoch(epochs),
            resumed_from=epoch,
        )
        self.log(f"resuming from {path} (epoch {epoch} of {epochs})")
        return run

    def _start_quantization(self, ema: WeightAverage | None) -> torch.optim.Optimizer:
        """The quantization phase begins: k-means codebooks and a fresh codebook optimizer."""
        if self.config.train.schedule == "two_step" and ema is not None:
            self.model.load_state_dict(ema.state)  # the frozen network is the averaged one
        if self.config.quantizer.init == "kmeans":
            self._kmeans_init(eval_mode=(self.config.train.schedule == "two_step"))
            if ema is not None:
                ema.reset(self.model, "quantizer.")
        return self._codebook_optimizer()

    def _run_epoch(
        self,
        run: _Run,
        optimizers: dict[str, torch.optim.Optimizer],
        ema: WeightAverage | None,
        bar: Any,
    ) -> dict[str, Any]:
        """One epoch of the current phase; returns its log record (mean losses, lr, ...)."""
        quantize = run.epoch >= run.quant_epoch
        order, rng = self._epoch_order(run.epoch)
        if self.config.train.schedule == "two_step" and quantize:
            if run.frozen_features is None:
                run.frozen_features = self._training_features()
            sums = self._codebook_epoch(run, order, optimizers["codebooks"], bar)
            record: dict[str, Any] = {"epoch": run.epoch + 1, "phase": "quantization", "lr": 0.0}
        else:
            sums, lr, accuracy = self._network_epoch(
                run, order, rng, quantize, optimizers, ema, bar
            )
            record = {
                "epoch": run.epoch + 1,
                "phase": "quantization" if quantize else "features",
                "lr": lr,
            }
            if accuracy is not None:
                record["train_accuracy"] = accuracy
        record.update({k: v / len(order) for k, v in sums.items()})
        return record

    def _network_epoch(
        self,
        run: _Run,
        order: np.ndarray,
        rng: np.random.Generator,
        quantize: bool,
        optimizers: dict[str, torch.optim.Optimizer],
        ema: WeightAverage | None,
        bar: Any,
    ) -> tuple[dict[str, float], float, float | None]:
        """Network steps over one epoch: (summed loss parts, last lr, training accuracy)."""
        cfg = self.config.train
        network_opt, codebook_opt = optimizers["network"], optimizers["codebooks"]
        total_steps = self._network_steps(run)
        steps = self.steps_per_epoch()
        sums: dict[str, float] = {}
        correct = seen = 0
        lr = 0.0
        scaler = self.scaler
        self.model.train()
        for step, (index, raw) in enumerate(zip(order, self.reader.read(order), strict=True)):
            lr = learning_rate(
                run.epoch * steps + step, total_steps, cfg.lr, cfg.lr_schedule, cfg.warmup_fraction
            )
            for group in network_opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            x, targets = self._batch(raw, index, rng, augment=True)
            loss, logits = self._forward_loss(
                x, targets, quantize, detach=(cfg.schedule == "two_phase")
            )
            loss = self._agreed(loss)
            self._check_finite(loss, run.epoch, step, lr)
            network_opt.zero_grad(set_to_none=True)
            codebook_opt.zero_grad(set_to_none=True)
            if loss.total.requires_grad:
                scaler.scale(loss.total).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(network_opt)
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in network_opt.param_groups for p in g["params"]], cfg.grad_clip
                    )
                scaler.step(network_opt)
                if quantize:
                    scaler.step(codebook_opt)
                scaler.update()
            if ema is not None:
                ema.update(self.model)
            for name, value in loss.parts.items():
                sums[name] = sums.get(name, 0.0) + value
            if not self.config.model.multilabel and targets.ndim == 1:
                correct += int((logits.argmax(1) == targets).sum())
                seen += len(targets)
            if bar is not None:
                bar.update(1)
                if step % 5 == 0 or step == len(order) - 1:
                    bar.set_postfix_str(
                        f"epoch {run.epoch + 1}/{run.epochs}, {_running_losses(sums, step + 1)}"
                    )
        if self.dist is not None:
            counted = ddp.mean_over_ranks({"correct": correct, "seen": seen}, self.dist)
            correct, seen = counted["correct"], counted["seen"]  # means: the ratio is the same
        return sums, lr, (correct / seen if seen else None)

    def _codebook_epoch(
        self, run: _Run, order: np.ndarray, optimizer: torch.optim.Optimizer, bar: Any
    ) -> dict[str, float]:
        """One epoch of codebook-only training on frozen features (two-step schedule)."""
        assert run.frozen_features is not None
        quantizer = self.model.quantizer
        sums: dict[str, float] = {}
        for step, index in enumerate(order):
            x = torch.from_numpy(run.frozen_features[index]).to(self.device)
            with full_precision(self.device):
                energy, terms = self.loss_fn.energy(x, quantizer(x))
            parts = {name: float(value.detach()) for name, value in terms.items()}
            parts["total"] = parts["E"]
            loss = self._agreed(LossOutput(energy, parts))
            parts = loss.parts
            self._check_finite(loss, run.epoch, step, 0.0)
            optimizer.zero_grad(set_to_none=True)
            (self.config.loss.tau * energy).backward()
            if self.dist is not None:  # not through DDP: the codebooks' gradient by hand
                ddp.all_reduce_mean_(
                    [quantizer.codebooks.grad], self.dist, "all-reducing codebook gradients"
                )
            optimizer.step()
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"phase codebooks, E {sums['E'] / (step + 1):.3g}")
        return sums

    def _epoch_line(self, run: _Run, record: dict[str, Any]) -> str:
        """The one line per epoch printed where no progress bar is shown (a pipe, a file)."""
        losses = _running_losses(record, 1)
        accuracy = record.get("train_accuracy")
        extra = f", train accuracy {accuracy:.3f}" if accuracy is not None else ""
        return (
            f"epoch {run.epoch}/{run.epochs} ({record['phase']}): {losses}{extra}; "
            f"{record['seconds']:.1f} s"
        )

    def _finish(self, run: _Run, ema: WeightAverage | None, started: float) -> TrainResult:
        """Final weights (EMA), optional final k-means, the saved model."""
        cfg = self.config.train
        if ema is not None and not (cfg.schedule == "two_step" and run.quant_epoch < run.epochs):
            self.model.load_state_dict(ema.state)
        if cfg.final_kmeans or not self.config.loss.uses_quantization:
            self._kmeans_init(eval_mode=True)
        self.model.eval()
        wall = self.clock() - started

        def save() -> str:
            return str(
                self.model.save_checkpoint(
                    self.run_dir.model_dir,
                    extra={
                        "epochs": run.epochs,
                        "plan": run.plan,
                        "history": run.history,
                        "precision": self.precision,
                    },
                    config=self.config,
                )
            )

        model_dir = Path(ddp.rank0_decides(self.dist, save, "saving the final model"))
        self.log(f"saved the model to {model_dir} ({run.epochs} epochs, {wall:.1f} s in this call)")
        return TrainResult(
            model=self.model,
            epochs=run.epochs,
            history=run.history,
            wall_seconds=wall,
            model_dir=model_dir,
            resumed_from_epoch=run.resumed_from,
            planned=run.plan,
            precision=self.precision,
            rank=self.dist.rank if self.dist is not None else 0,
            world_size=self.dist.world_size if self.dist is not None else 1,
        )


def train_model(
    config: DPQConfig,
    dataset: LabelledInputs,
    word_vectors: np.ndarray | None,
    out_dir: str | Path | RunDirectory,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    device: str | torch.device | None = "cpu",
    workers: int | None = None,
    distributed: DistributedContext | None | str = "auto",
) -> TrainResult:
    """Build a model from ``config`` (seeded by ``train.seed``) and train it on ``device``
    (``"auto"``: CUDA where there is a GPU), reading on-demand images with ``workers``
    processes; under torchrun with DistributedDataParallel (``distributed``, see
    :class:`Trainer`).

    On ``resume`` the model is rebuilt from the same config and then loaded from the newest
    checkpoint in ``out_dir``.
    """
    target = resolve_device(device)  # a clear error before anything is built
    seed_everything(config.train.seed)
    model = DPQModel(config)
    trainer = Trainer(
        config,
        model,
        dataset,
        word_vectors,
        out_dir,
        progress=progress,
        log=log,
        device=target,
        workers=workers,
        distributed=distributed,
    )
    return trainer.train(resume=resume)
