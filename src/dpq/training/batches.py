"""What each training step reads: the training set (:class:`ArrayDataset`, or anything
:class:`LabelledInputs` describes), the epoch's batches of rows and their prepared inputs.

:class:`EpochBatches` draws an epoch's order and its augmentations from
``np.random.default_rng([seed, epoch])`` (so a resumed run, an on-demand reader with worker
processes and an in-memory array all see the same batches), splits every global batch across
the ranks of a multi-process run (:func:`dpq.training.ddp.rank_batches`), and turns a batch
of raw inputs into network inputs and targets: crop and flip, RandAugment, the network's
normalisation, cutout and mixup, as ``train`` configures them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from dpq.config import DPQConfig
from dpq.model.retrieval_network import RetrievalNetwork
from dpq.training import ddp
from dpq.training.augment import crop_flip, cutout, mixup, rand_augment
from dpq.training.ddp import DistributedContext


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


class EpochBatches:
    """The batches of every epoch of a training set.

    Args:
        labels: int64 (N,) class ids or multi-hot (N, C) of the training items.
        config: ``train`` (seed, batch size, augmentation) and ``model`` (classes,
            multi-label) are read.
        network: prepares the inputs (its normalisation, channels-last memory).
        dist: the multi-process run (each rank gets its share of every batch), or None.
    """

    def __init__(
        self,
        labels: np.ndarray,
        config: DPQConfig,
        network: RetrievalNetwork,
        dist: DistributedContext | None = None,
    ) -> None:
        self.labels = labels
        self.config = config
        self.network = network
        self.dist = dist

    def steps_per_epoch(self) -> int:
        """Batches per epoch (the last incomplete batch is dropped when there is a full one)."""
        return max(1, len(self.labels) // self.config.train.batch_size)

    def order(self, epoch: int) -> tuple[np.ndarray, np.random.Generator]:
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

    def targets(self, index: np.ndarray) -> torch.Tensor:
        """Labels of the rows ``index`` on the network's device: int64 (B,) or float (B, C)."""
        labels = torch.from_numpy(np.ascontiguousarray(self.labels[index]))
        labels = labels.to(self.network.device)
        return labels.float() if self.config.model.multilabel else labels.long()

    def prepare(
        self, raw: torch.Tensor, index: np.ndarray, rng: np.random.Generator, augment: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared network inputs and targets (int64 ids or float (B, C)) of one batch.

        Args:
            raw: the batch's raw inputs (uint8 (B, H, W, 3) or float (B, F)), on any device.
            index: int64 (B,) their rows (for the labels).
            rng: the epoch's generator (augmentations).
            augment: apply the configured augmentations.
        """
        cfg = self.config.train
        network = self.network
        raw = raw.to(network.device, non_blocking=True)
        targets = self.targets(index)
        images = network.input_kind == "images"
        if augment and images:
            raw = crop_flip(raw, rng, cfg.crop_pad, cfg.flip)
            if cfg.randaugment_ops > 0:
                raw = rand_augment(raw, rng, cfg.randaugment_ops, cfg.randaugment_magnitude)
        x = network.prepare_inputs(raw)
        if augment and images and cfg.cutout > 0:
            x = cutout(x, rng, cfg.cutout)
        if augment and cfg.mixup_alpha > 0:
            one_hot = torch.nn.functional.one_hot(targets, self.config.model.num_classes).float()
            x, targets = mixup(x, one_hot, rng, cfg.mixup_alpha)
            if network.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        return x, targets
