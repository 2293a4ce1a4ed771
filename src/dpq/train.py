"""Training loop of a DPQ model: phases, augmentation, schedules, checkpoints, resume.

:class:`Trainer` trains a :class:`~dpq.model.DPQModel` on labelled inputs (uint8 images
(N, H, W, 3), or float32 features (N, F) for the identity backbone) with the losses of
:class:`~dpq.losses.DPQLoss`, following ``config.train.schedule``:

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

Every epoch ends with a checkpoint ``out_dir/checkpoints/epoch-NNNN/`` (model.safetensors,
config.json, optimizer.safetensors, trainer_state.json), written to a temporary folder and
renamed, so a checkpoint is complete or absent. ``train(resume=True)`` continues from the
newest one after the process was killed. The final model goes to ``out_dir/model/``.

With a time budget, the trainer first times a few steps on a copy of the model (the copy is
thrown away), fixes the number of epochs that fit, logs it, and then trains exactly as
``epochs=<that number>`` would.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from dpq.augment import rand_augment
from dpq.config import DPQConfig, config_differences
from dpq.losses import DPQLoss, LossOutput, quantization_losses
from dpq.model import DPQModel, save_tensors_atomic, write_atomic

CHECKPOINTS_DIR = "checkpoints"
FINAL_MODEL_DIR = "model"
LOG_FILE = "train_log.jsonl"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FORMAT = "dpq-trainer-state"
STATE_VERSION = 1


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the likely cause."""


class LabelledInputs(Protocol):
    """Anything with ``images`` (uint8 (N, H, W, 3) or float (N, F)) and ``labels``."""

    images: Any
    labels: np.ndarray


@dataclass(frozen=True)
class ArrayDataset:
    """Inputs and labels held in memory.

    Attributes:
        images: uint8 (N, H, W, 3) images, or float32 (N, F) features.
        labels: int64 (N,) class ids or multi-hot (N, C).
    """

    images: np.ndarray
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
    """

    model: DPQModel
    epochs: int
    history: list[dict[str, Any]]
    wall_seconds: float
    model_dir: Path
    resumed_from_epoch: int = 0
    planned: dict[str, Any] = field(default_factory=dict)


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by ``OMP_NUM_THREADS``
    when that is set (e.g. to keep a test or a second job on one core)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        cores = max(1, os.cpu_count() or 1)
    limit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if limit.isdigit() and int(limit) > 0:
        cores = min(cores, int(limit))
    return cores


def seed_everything(seed: int) -> None:
    """Seed Python and torch (call before building the model for a reproducible init).

    dpq itself draws numpy randomness from explicitly seeded generators only."""
    random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ augmentation


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad indices (no edge repeat) into [0, size)."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.abs(index) % period
    return np.where(index >= size, period - index, index)


def crop_flip(images: torch.Tensor, rng: np.random.Generator, pad: int, flip: bool) -> torch.Tensor:
    """Random crops of reflect-padded images and random horizontal flips, in one gather.

    Args:
        images: uint8 (B, H, W, 3).
        rng: source of the crop offsets and flips.
        pad: padding on each side (0: no crop).
        flip: mirror each image with probability 1/2.

    Returns:
        uint8 (B, H, W, 3).
    """
    batch, height, width = images.shape[:3]
    if pad == 0 and not flip:
        return images
    dy = rng.integers(-pad, pad + 1, size=batch) if pad else np.zeros(batch, np.int64)
    dx = rng.integers(-pad, pad + 1, size=batch) if pad else np.zeros(batch, np.int64)
    rows = _reflect(dy[:, None] + np.arange(height)[None, :], height)
    cols = _reflect(dx[:, None] + np.arange(width)[None, :], width)
    if flip:
        mirrored = rng.random(batch) < 0.5
        cols = np.where(mirrored[:, None], cols[:, ::-1], cols)
    b = torch.arange(batch)[:, None, None]
    return images[b, torch.from_numpy(rows)[:, :, None], torch.from_numpy(cols)[:, None, :]]


def cutout(images: torch.Tensor, rng: np.random.Generator, size: int) -> torch.Tensor:
    """Set a size x size square (clipped at the border) of each image to 0 (the mean colour
    after normalisation), at a uniformly random centre.

    Args:
        images: float (B, 3, H, W), normalised.

    Returns:
        float (B, 3, H, W), a new tensor.
    """
    batch, _, height, width = images.shape
    cy = torch.from_numpy(rng.integers(0, height, size=batch))
    cx = torch.from_numpy(rng.integers(0, width, size=batch))
    ys = torch.arange(height)[None, :] - cy[:, None] + size // 2  # (B, H), 0..size-1 inside
    xs = torch.arange(width)[None, :] - cx[:, None] + size // 2
    inside = ((ys >= 0) & (ys < size))[:, :, None] & ((xs >= 0) & (xs < size))[:, None, :]
    return images.masked_fill(inside[:, None, :, :], 0.0)


def mixup(
    inputs: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each example with another of the batch: lam ~ Beta(alpha, alpha).

    Args:
        inputs: float (B, ...).
        targets: float (B, C) probabilities.

    Returns:
        mixed inputs and mixed target probabilities.
    """
    lam = float(rng.beta(alpha, alpha))
    order = torch.from_numpy(rng.permutation(inputs.shape[0]))
    return lam * inputs + (1 - lam) * inputs[order], lam * targets + (1 - lam) * targets[order]


# ------------------------------------------------------------------------------ schedules


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


# ------------------------------------------------------------------------------ optimizer state


def _optimizer_to_tensors(
    optimizer: torch.optim.Optimizer, prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (safetensors) and JSON metadata."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, entries in state["state"].items():
        plain: dict[str, Any] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value
            else:
                plain[key] = value
        meta["state"][str(index)] = plain
    return tensors, meta


def _optimizer_from_tensors(
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    prefix: str,
) -> None:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, value in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        index, key = name[len(prefix) + 1 :].split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ------------------------------------------------------------------------------ trainer


def _dataset_fingerprint(inputs: Any, labels: np.ndarray) -> str:
    """Cheap identity of a training set: shapes, all labels and a sample of inputs."""
    digest = hashlib.sha256()
    digest.update(repr((tuple(inputs.shape), str(inputs.dtype), labels.shape)).encode())
    digest.update(np.ascontiguousarray(labels).tobytes())
    step = max(1, len(labels) // 64)
    digest.update(np.ascontiguousarray(inputs[::step]).tobytes())
    return digest.hexdigest()


class Trainer:
    """Train a DPQ model; see the module docstring for the schedules.

    Args:
        config: the full configuration (its model/quantizer sections must be the model's).
        model: the network to train (built from ``config``).
        dataset: labelled training inputs (``.images``, ``.labels``), e.g.
            :class:`dpq.data.ImageDataset` or :class:`ArrayDataset`.
        word_vectors: float (C, D) label word vectors (needed by the semantic loss).
        out_dir: where checkpoints, the log and the final model go.
        progress: show a tqdm bar with the running losses.
        log: function receiving one-line messages (default: print to stderr).
    """

    def __init__(
        self,
        config: DPQConfig,
        model: DPQModel,
        dataset: LabelledInputs,
        word_vectors: np.ndarray | None,
        out_dir: str | Path,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if model.config.model != config.model or model.config.quantizer != config.quantizer:
            diffs = config_differences(
                {
                    "model": model.config.to_dict()["model"],
                    "quantizer": model.config.to_dict()["quantizer"],
                },
                {"model": config.to_dict()["model"], "quantizer": config.to_dict()["quantizer"]},
            )
            raise ValueError(
                "the model was built from another model/quantizer config than the one given to "
                f"the Trainer (model vs trainer): {'; '.join(diffs)}; build it from this config."
            )
        # The model carries the training config from now on (saved with every checkpoint).
        model.config = config
        if config.train.channels_last and model.input_kind == "images":
            model.backbone.to(memory_format=torch.channels_last)
        self.config = config
        self.model = model
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
        )
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.fingerprint = _dataset_fingerprint(self.inputs, self.labels)

    # -------------------------------------------------------------- checks

    def _check_dataset(self) -> None:
        cfg = self.config
        n = len(self.labels)
        if len(self.inputs) != n:
            raise ValueError(f"{len(self.inputs)} inputs but {n} labels; give one label per input.")
        if isinstance(self.inputs, np.ndarray):
            self.model.check_inputs(self.inputs)
            if self.model.input_kind == "features" and not np.isfinite(self.inputs).all():
                raise ValueError("the training features contain NaN or inf; clean them first.")
        elif self.model.input_kind == "images":
            raise ValueError(
                "training images must be an in-memory uint8 (N, H, W, 3) array; load the "
                "dataset into memory (e.g. np.asarray(dataset.images))."
            )
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
                f"training items; got {n}. Use init='normal' or a smaller codebook_size."
            )
        if n < 2:
            raise ValueError(f"training needs at least 2 items; got {n}.")

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

    # -------------------------------------------------------------- optimisers

    def _network_parameters(self) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if name == "quantizer.codebooks":
                continue
            (decay if param.ndim > 1 else no_decay).append(param)
        wd = self.config.train.weight_decay
        return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]

    def _make_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
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
        codebooks = torch.optim.Adam([self.model.quantizer.codebooks], lr=cfg.codebook_lr)
        return network, codebooks

    # -------------------------------------------------------------- batches

    def _targets(self, index: np.ndarray) -> torch.Tensor:
        labels = torch.from_numpy(np.ascontiguousarray(self.labels[index]))
        return labels.float() if self.config.model.multilabel else labels.long()

    def _batch(
        self, index: np.ndarray, rng: np.random.Generator, augment: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared network inputs and targets (int64 ids or float (B, C)) of one batch."""
        cfg = self.config.train
        raw = torch.from_numpy(np.ascontiguousarray(self.inputs[index]))
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
            if self.config.train.channels_last and images:
                x = x.contiguous(memory_format=torch.channels_last)
        return x, targets

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.random.Generator]:
        rng = np.random.default_rng([self.config.train.seed, epoch])
        order = rng.permutation(len(self.labels))
        steps = self.steps_per_epoch()
        size = min(self.config.train.batch_size, len(order))
        return order[: steps * size].reshape(steps, size), rng

    # -------------------------------------------------------------- one step

    def _forward_loss(
        self, x: torch.Tensor, targets: torch.Tensor, quantize: bool, detach: bool
    ) -> tuple[LossOutput, torch.Tensor]:
        with torch.autocast("cpu", torch.bfloat16, enabled=self.config.train.bf16):
            out = self.model(x, quantize=quantize, detach_quantizer_input=detach)
        loss = self.loss_fn(
            out.semantic, out.logits.float(), targets, out.quantized, out.quantizer_input
        )
        return loss, out.logits

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
        if cfg.bf16:
            cause += ", or switch bf16 off"
        if {"E", "quan", "quan_hard", "match"} & set(bad_terms):
            cause += "; the quantization loss is non-finite, so also try a smaller loss.tau"
        last = self._latest_checkpoint()
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
        """Eval-mode features of the (unaugmented) training set: float32 (N, D)."""
        return self.model.extract_features(
            np.asarray(self.inputs),
            batch_size=max(256, self.config.train.batch_size),
            tta_flip=False,
        )

    @torch.no_grad()
    def _features_as_trained(self) -> np.ndarray:
        """Features of the unaugmented training set as the training loss sees them (BatchNorm
        on batch statistics), float32 (N, D); BatchNorm running statistics are left as they
        were. Early in training the running statistics are far from the batch statistics, so
        eval-mode features would put the codebooks where the training features are not."""
        model = self.model
        saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
        was_training = model.training
        model.train()
        batch_size = max(256, self.config.train.batch_size)
        out = np.empty((len(self.labels), self.config.quantizer.dim), dtype=np.float32)
        try:
            with torch.autocast("cpu", torch.bfloat16, enabled=self.config.train.bf16):
                for start in range(0, len(self.labels), batch_size):
                    index = np.arange(start, min(start + batch_size, len(self.labels)))
                    raw = torch.from_numpy(np.ascontiguousarray(self.inputs[index]))
                    features = model(model.prepare_inputs(raw), quantize=False).features
                    out[index] = features.float().numpy()
        finally:
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])
            model.train(was_training)
        return out

    def _kmeans_init(self, eval_mode: bool = False) -> np.ndarray:
        features = self._training_features() if eval_mode else self._features_as_trained()
        errors = self.model.quantizer.init_kmeans(
            features, iterations=self.config.train.kmeans_iterations, seed=self.config.train.seed
        )
        self.log(
            "k-means codebook init on "
            f"{len(features)} training features: mean squared error per level "
            + " ".join(f"{e:.4g}" for e in errors)
        )
        return errors

    # -------------------------------------------------------------- checkpoints

    def _checkpoint_root(self) -> Path:
        return self.out_dir / CHECKPOINTS_DIR

    def _complete_checkpoints(self) -> list[Path]:
        root = self._checkpoint_root()
        if not root.is_dir():
            return []
        found = [
            p
            for p in root.iterdir()
            if p.is_dir() and p.name.startswith("epoch-") and (p / STATE_FILE).is_file()
        ]
        return sorted(found, key=lambda p: p.name)

    def _latest_checkpoint(self) -> Path | None:
        found = self._complete_checkpoints()
        return found[-1] if found else None

    def _save_checkpoint(
        self,
        epoch: int,
        state: dict[str, Any],
        network_opt: torch.optim.Optimizer,
        codebook_opt: torch.optim.Optimizer,
        ema: WeightAverage | None,
    ) -> Path:
        root = self._checkpoint_root()
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"epoch-{epoch + 1:04d}"
        tmp = root / f".{final.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        self.model.save_checkpoint(tmp, extra={"epoch": epoch + 1})
        tensors, network_meta = _optimizer_to_tensors(network_opt, "network")
        codebook_tensors, codebook_meta = _optimizer_to_tensors(codebook_opt, "codebooks")
        tensors.update(codebook_tensors)
        if ema is not None:
            tensors.update({f"ema.{k}": v for k, v in ema.state.items()})
        save_tensors_atomic(tmp / OPTIMIZER_FILE, tensors)
        record = {
            **state,
            "optimizers": {"network": network_meta, "codebooks": codebook_meta},
            "ema_updates": ema.updates if ema is not None else None,
        }
        write_atomic(tmp / STATE_FILE, json.dumps(record, indent=1).encode())
        if final.exists():  # a re-run of this epoch after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self._complete_checkpoints()[: -self.config.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _load_checkpoint(
        self,
        path: Path,
        network_opt: torch.optim.Optimizer,
        codebook_opt: torch.optim.Optimizer,
        ema: WeightAverage | None,
    ) -> dict[str, Any]:
        from safetensors.torch import load_file

        state = json.loads((path / STATE_FILE).read_text())
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"{path / STATE_FILE} is not a dpq trainer state (version {STATE_VERSION})."
            )
        saved = DPQConfig.from_dict(state["config"])
        if saved != self.config:
            diffs = config_differences(saved.to_dict(), self.config.to_dict())
            raise ValueError(
                f"cannot resume from {path}: its config differs from this run's (saved vs "
                "now): "
                + "; ".join(diffs[:8])
                + ". Resume with the same settings, or start a new run in another --out."
            )
        if state["dataset_fingerprint"] != self.fingerprint:
            raise ValueError(
                f"cannot resume from {path}: it was trained on a different training set "
                f"(fingerprint mismatch); resume with the same data and split."
            )
        loaded = DPQModel.from_checkpoint(path, config=self.config)
        self.model.load_state_dict(loaded.state_dict())
        tensors = load_file(str(path / OPTIMIZER_FILE))
        _optimizer_from_tensors(network_opt, tensors, state["optimizers"]["network"], "network")
        _optimizer_from_tensors(
            codebook_opt, tensors, state["optimizers"]["codebooks"], "codebooks"
        )
        if ema is not None:
            for name in ema.state:
                ema.state[name].copy_(tensors[f"ema.{name}"])
            ema.updates = int(state["ema_updates"] or 0)
        return state

    def _append_log(self, record: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / LOG_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    # -------------------------------------------------------------- time budget

    def _plan_epochs(self, started: float) -> tuple[int, dict[str, Any]]:
        cfg = self.config.train
        if cfg.time_budget_minutes is None:
            return cfg.epochs, {"epochs": cfg.epochs, "source": "config"}
        budget = cfg.time_budget_minutes * 60.0
        seconds_per_step = self._time_steps()
        steps = self.steps_per_epoch()
        epoch_seconds = seconds_per_step * steps
        # one pass over the training set for the k-means init (forward only ~ 1/3 of a step)
        # plus k-means itself, the final save and one spare epoch's worth of slack for noise.
        fixed = seconds_per_step * steps / 3 + 10.0 + 0.03 * budget
        remaining = budget - (time.perf_counter() - started) - fixed
        epochs = max(1, int(remaining // epoch_seconds))
        plan = {
            "epochs": epochs,
            "source": "time_budget",
            "budget_minutes": cfg.time_budget_minutes,
            "seconds_per_step": round(seconds_per_step, 4),
            "steps_per_epoch": steps,
            "seconds_per_epoch": round(epoch_seconds, 2),
        }
        self.log(
            f"time budget {cfg.time_budget_minutes:g} min: {seconds_per_step:.3f} s/step x "
            f"{steps} steps = {epoch_seconds:.1f} s/epoch -> {epochs} epochs"
        )
        return epochs, plan

    def _replan(
        self, started: float, epoch_seconds: float, epochs: int, done: int = 1, grow: bool = False
    ) -> int:
        """Epoch count that fits the budget, once ``done`` real epochs have been timed.

        The throw-away timing of :meth:`_time_steps` can be off either way, and a shared
        machine can slow down for a while; after every epoch the plan is checked against
        the time left. It shrinks whenever it no longer fits (never below the ``done``
        epochs that ran), so a time budget is kept; it grows only when ``grow`` is set.
        The trainer asks for growth while the learning rate still warms up (the schedule is
        simply stretched), and later only back up to its longest plan so far (a plan cut
        by a passing slowdown recovers). The learning-rate schedule follows the new count.

        Args:
            started: ``time.perf_counter()`` when the run started.
            epoch_seconds: the recent seconds per epoch.
            epochs: the current plan.
            done: epochs finished.
            grow: allow a longer plan when epochs run faster than planned.
        """
        budget = float(self.config.train.time_budget_minutes or 0.0) * 60.0
        fixed = epoch_seconds / 3 + 10.0 + 0.03 * budget  # k-means pass, final save, slack
        remaining = budget - (time.perf_counter() - started) - fixed
        fitting = done + max(0, int(remaining // max(epoch_seconds, 1e-9)))
        return max(done, 1, fitting if grow else min(epochs, fitting))

    def _time_steps(self, max_steps: int = 12, warmup_steps: int = 2) -> float:
        """Seconds per training step, measured on a throw-away copy of model and optimizers."""
        original = self.model
        rng_state = torch.get_rng_state()
        self.model = copy.deepcopy(original)
        try:
            network_opt, codebook_opt = self._make_optimizers()
            self.model.train()
            order, rng = self._epoch_order(10**6)
            steps = min(len(order), max_steps + warmup_steps)
            quantize = self.config.loss.uses_quantization
            times = []
            for step in range(steps):
                begin = time.perf_counter()
                x, targets = self._batch(order[step % len(order)], rng, augment=True)
                loss, _ = self._forward_loss(x, targets, quantize, detach=False)
                network_opt.zero_grad(set_to_none=True)
                codebook_opt.zero_grad(set_to_none=True)
                if loss.total.requires_grad:
                    loss.total.backward()
                network_opt.step()
                codebook_opt.step()
                times.append(time.perf_counter() - begin)
            measured = times[warmup_steps:] or times
            return float(np.median(measured)) * 1.05
        finally:
            self.model = original
            torch.set_rng_state(rng_state)

    # -------------------------------------------------------------- the loop

    def train(self, resume: bool = False) -> TrainResult:
        """Run (or continue) the training and save the final model to ``out_dir/model``.

        Args:
            resume: continue from the newest checkpoint in ``out_dir`` (the config and the
                training set must be the same as in the interrupted run).

        Raises:
            ValueError: ``out_dir`` already holds a run and ``resume`` is false; no
                checkpoint to resume from; a config or data mismatch on resume.
            TrainingDiverged: the loss became NaN/inf (the last good checkpoint is kept).
        """
        started = time.perf_counter()
        cfg = self.config.train
        torch.set_num_threads(cfg.num_threads or available_cores())
        existing = self._latest_checkpoint()
        if existing is not None and not resume:
            raise ValueError(
                f"{self.out_dir} already holds a training run (newest checkpoint {existing.name}); "
                f"pass --resume to continue it, or choose another output directory."
            )
        if resume and existing is None:
            raise ValueError(
                f"nothing to resume: {self._checkpoint_root()} holds no complete checkpoint."
            )
        network_opt, codebook_opt = self._make_optimizers()
        ema = WeightAverage(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        if resume and existing is not None:
            state = self._load_checkpoint(existing, network_opt, codebook_opt, ema)
            epochs, plan = int(state["epochs"]), state["plan"]
            start_epoch, history = int(state["epoch"]), list(state["history"])
            self.log(f"resuming from {existing} (epoch {start_epoch} of {epochs})")
        else:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            epochs, plan = self._plan_epochs(started)
            start_epoch, history = 0, []
        longest_plan = epochs
        quant_epoch = self.quantization_start_epoch(epochs)
        steps = self.steps_per_epoch()
        schedule = cfg.schedule
        network_epochs = quant_epoch if schedule == "two_step" else epochs
        total_network_steps = network_epochs * steps
        base_state = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "epochs": epochs,
            "plan": plan,
            "dataset_fingerprint": self.fingerprint,
        }
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=epochs * steps,
                initial=start_epoch * steps,
                unit="step",
                desc="train",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        frozen_features: np.ndarray | None = None
        epoch_walls: list[float] = []
        try:
            epoch = start_epoch
            while epoch < epochs:
                epoch_start = time.perf_counter()
                quantize = epoch >= quant_epoch
                if epoch == quant_epoch:
                    if schedule == "two_step" and ema is not None:
                        # the frozen network of the second step is the averaged one
                        self.model.load_state_dict(ema.state)
                    if self.config.quantizer.init == "kmeans":
                        self._kmeans_init(eval_mode=(schedule == "two_step"))
                        codebook_opt = torch.optim.Adam(
                            [self.model.quantizer.codebooks], lr=cfg.codebook_lr
                        )
                        if ema is not None:
                            ema.reset(self.model, "quantizer.")
                order, rng = self._epoch_order(epoch)
                sums: dict[str, float] = {}
                correct = seen = 0
                lr = 0.0
                if schedule == "two_step" and quantize:
                    if frozen_features is None:
                        frozen_features = self._training_features()
                    sums = self._codebook_epoch(frozen_features, order, codebook_opt, epoch, bar)
                else:
                    self.model.train()
                    for step, index in enumerate(order):
                        global_step = epoch * steps + step
                        lr = learning_rate(
                            global_step,
                            total_network_steps,
                            cfg.lr,
                            cfg.lr_schedule,
                            cfg.warmup_fraction,
                        )
                        for group in network_opt.param_groups:
                            group["lr"] = lr
                        x, targets = self._batch(index, rng, augment=True)
                        loss, logits = self._forward_loss(
                            x, targets, quantize, detach=(schedule == "two_phase")
                        )
                        self._check_finite(loss, epoch, step, lr)
                        network_opt.zero_grad(set_to_none=True)
                        codebook_opt.zero_grad(set_to_none=True)
                        if loss.total.requires_grad:
                            loss.total.backward()
                            if cfg.grad_clip > 0:
                                torch.nn.utils.clip_grad_norm_(
                                    [p for g in network_opt.param_groups for p in g["params"]],
                                    cfg.grad_clip,
                                )
                            network_opt.step()
                            if quantize:
                                codebook_opt.step()
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
                                bar.set_postfix_str(_running_losses(sums, step + 1, epoch, epochs))
                record = {
                    "epoch": epoch + 1,
                    "phase": "quantization" if quantize else "features",
                    "lr": lr,
                    "seconds": round(time.perf_counter() - epoch_start, 3),
                    **{k: v / len(order) for k, v in sums.items()},
                }
                if seen:
                    record["train_accuracy"] = correct / seen
                self._check_weights(epoch)
                history.append(record)
                self._append_log(record)
                self._save_checkpoint(
                    epoch,
                    {**base_state, "epoch": epoch + 1, "history": history},
                    network_opt,
                    codebook_opt,
                    ema,
                )
                epoch += 1
                epoch_walls.append(time.perf_counter() - epoch_start)  # with the checkpoint
                if start_epoch == 0 and plan.get("source") == "time_budget" and epoch < epochs:
                    recent = epoch_walls[-3:]
                    # growing is safe while the learning rate still warms up and no phase
                    # boundary has passed (the rest of the schedule is simply stretched);
                    # later, a plan cut by a passing slowdown may grow back to the longest one
                    grow = epoch < cfg.warmup_fraction * epochs and epoch < quant_epoch
                    revised = self._replan(
                        started, sum(recent) / len(recent), epochs, epoch, grow=True
                    )
                    if grow:
                        longest_plan = max(longest_plan, revised)
                    else:
                        revised = min(revised, max(epochs, longest_plan))
                    if self.config.loss.uses_quantization and quant_epoch >= epoch:
                        revised = max(revised, epoch + 1)  # one quantization epoch at least
                    if revised != epochs:
                        self.log(
                            f"after epoch {epoch} ({record['seconds']:.1f} s; planned "
                            f"{plan['seconds_per_epoch']:.1f} s): {revised} epochs instead of "
                            f"{epochs} to "
                            + ("stay within" if revised < epochs else "use")
                            + " the time budget"
                        )
                        epochs = revised
                        plan = {**plan, "epochs": epochs, "replanned_after_epoch": epoch}
                        # quantization that has started goes on; one that has not cannot start
                        # before the next epoch
                        if quant_epoch >= epoch:
                            quant_epoch = max(self.quantization_start_epoch(epochs), epoch)
                            if self.config.loss.uses_quantization:
                                quant_epoch = min(quant_epoch, epochs - 1)
                        network_epochs = quant_epoch if schedule == "two_step" else epochs
                        total_network_steps = network_epochs * steps
                        base_state = {**base_state, "epochs": epochs, "plan": plan}
                        if bar is not None:
                            bar.total = epochs * steps
                            bar.refresh()
        finally:
            if bar is not None:
                bar.close()
        if ema is not None and not (schedule == "two_step" and quant_epoch < epochs):
            self.model.load_state_dict(ema.state)
        if cfg.final_kmeans or not self.config.loss.uses_quantization:
            self._kmeans_init(eval_mode=True)
        self.model.eval()
        wall = time.perf_counter() - started
        model_dir = self.model.save_checkpoint(
            self.out_dir / FINAL_MODEL_DIR,
            extra={"epochs": epochs, "plan": plan, "history": history},
        )
        self.log(f"saved the model to {model_dir} ({epochs} epochs, {wall:.1f} s in this call)")
        return TrainResult(
            model=self.model,
            epochs=epochs,
            history=history,
            wall_seconds=wall,
            model_dir=model_dir,
            resumed_from_epoch=start_epoch,
            planned=plan,
        )

    def _codebook_epoch(
        self,
        features: np.ndarray,
        order: np.ndarray,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        bar: Any,
    ) -> dict[str, float]:
        """One epoch of codebook-only training on frozen features (two-step schedule)."""
        cfg = self.config.loss
        quantizer = self.model.quantizer
        sums: dict[str, float] = {}
        for step, index in enumerate(order):
            x = torch.from_numpy(features[index])
            out = quantizer(x)
            terms = quantization_losses(x, out.soft, out.hard, self.loss_fn.level_weights)
            energy = x.new_zeros(())
            parts: dict[str, float] = {}
            if cfg.use_soft:
                energy = energy + terms.quan
                parts["quan"] = float(terms.quan.detach())
            if cfg.use_hard:
                energy = energy + cfg.mu * terms.quan_hard
                parts["quan_hard"] = float(terms.quan_hard.detach())
            if cfg.use_match:
                energy = energy + cfg.nu * terms.match
                parts["match"] = float(terms.match.detach())
            parts["E"] = parts["total"] = float(energy.detach())
            self._check_finite(LossOutput(energy, parts), epoch, step, 0.0)
            optimizer.zero_grad(set_to_none=True)
            (cfg.tau * energy).backward()
            optimizer.step()
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value
            if bar is not None:
                bar.update(1)
                bar.set_postfix(phase="codebooks", E=f"{sums['E'] / (step + 1):.3g}")
        return sums


def load_training_source(
    source: str | Path | None,
    features: str | Path | None = None,
    labels: str | Path | None = None,
    image_root: str | Path | None = None,
    image_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """Load a labelled collection for training.

    Args:
        source: "digits", a CIFAR-10 source, a folder/zip of ``<class>/<image>``, or a
            DVSQ/DPQ list file (kind detected by :func:`dpq.data.detect_source_kind`).
        features, labels: instead of ``source``: a float (N, F) .npy file and its labels.
        image_root: list files: the folder or zip holding the listed images.
        image_size: resize images to this square size (folders, list files).

    Returns:
        (inputs, labels, class names, kind): inputs uint8 (N, H, W, 3) or float32 (N, F).
    """
    from dpq import data

    if features is not None:
        if labels is None:
            raise ValueError("--features needs --labels (a .npy/.txt file with one label per row).")
        loaded = data.load_features(features, labels)
        return loaded.features, loaded.labels, list(loaded.classes), "features"
    if source is None:
        raise ValueError("give a data source (a path, or 'digits') or --features with --labels.")
    if str(source) == "digits":
        dataset = data.load_digits()
        return np.asarray(dataset.images), dataset.labels, list(dataset.classes), "digits"
    kind = data.detect_source_kind(source)
    if kind == "cifar10":
        dataset = data.load_cifar10(source)
    elif kind == "image-folder":
        dataset = data.load_image_folder(source, image_size=image_size)
    else:
        if image_root is None:
            raise ValueError(
                f"{source} is a list file; pass --image-root, the folder or zip holding its images."
            )
        dataset = data.load_list_file(
            source, image_root, image_size=image_size or 256, in_memory=True
        )
    return np.asarray(dataset.images), dataset.labels, list(dataset.classes), kind


def _running_losses(sums: dict[str, float], steps: int, epoch: int, epochs: int) -> str:
    """Compact progress-bar text: epoch and running means of the main loss terms."""
    shown = [("total", "loss"), ("semantic", "L_S"), ("cls", "L_C"), ("E", "E")]
    parts = [f"epoch {epoch + 1}/{epochs}"]
    parts += [f"{label} {sums[key] / steps:.3g}" for key, label in shown if key in sums]
    return ", ".join(parts)


def train_model(
    config: DPQConfig,
    dataset: LabelledInputs,
    word_vectors: np.ndarray | None,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Build a model from ``config`` (seeded by ``train.seed``) and train it.

    On ``resume`` the model is rebuilt from the same config and then loaded from the newest
    checkpoint in ``out_dir``.
    """
    seed_everything(config.train.seed)
    model = DPQModel(config)
    trainer = Trainer(config, model, dataset, word_vectors, out_dir, progress=progress, log=log)
    return trainer.train(resume=resume)
