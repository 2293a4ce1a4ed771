"""Codebooks initialised from the training features, the same on every rank.

:class:`TrainingFeatures` computes the features of the unaugmented training set, in eval mode
or as the training loss sees them (train mode: BatchNorm on batch statistics, its running
statistics left as they were); in a multi-process run each rank computes its share of the
rows and every rank gets all of them. :func:`initialise_codebooks` hands them to the method
(:meth:`dpq.methods.base.RetrievalMethod.init_codebooks`, e.g. DPQ's residual k-means) on
rank 0 alone and broadcasts the resulting codebooks, so every rank starts from the same ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dpq.data.loading import BatchReader
from dpq.devices import autocast
from dpq.methods.base import RetrievalMethod
from dpq.model.retrieval_network import RetrievalNetwork
from dpq.training import ddp
from dpq.training.ddp import DistributedContext

FEATURE_KINDS = ("as_trained", "eval")


class TrainingFeatures:
    """Features float32 (N, D) of a training set, for initialising codebooks.

    Args:
        network: the network being trained.
        inputs: the training inputs (an array, or an on-demand reader with ``subset``).
        reader: the run's :class:`~dpq.data.loading.BatchReader` over ``inputs``.
        batch_size: inputs per forward pass.
        precision: the autocast of the as-trained pass ("fp32", "bf16", "fp16").
        workers: decoding processes of the eval-mode pass (an on-demand reader).
        dist: the multi-process run, or None.
    """

    def __init__(
        self,
        network: RetrievalNetwork,
        inputs: Any,
        reader: BatchReader,
        batch_size: int,
        precision: str = "fp32",
        workers: int | None = None,
        dist: DistributedContext | None = None,
    ) -> None:
        self.network = network
        self.inputs = inputs
        self.reader = reader
        self.batch_size = batch_size
        self.precision = precision
        self.workers = workers
        self.dist = dist

    def __len__(self) -> int:
        return len(self.inputs)

    def of_kind(self, kind: str) -> np.ndarray:
        """:meth:`as_trained` or :meth:`eval_mode` features, by name."""
        if kind not in FEATURE_KINDS:
            raise ValueError(f"feature kind must be one of {FEATURE_KINDS}; got {kind!r}.")
        return self.as_trained() if kind == "as_trained" else self.eval_mode()

    def eval_mode(self) -> np.ndarray:
        """Eval-mode searched features (no test-time flip) of every training item."""
        if self.dist is not None:
            return self._gathered(self._eval_rows)
        return self.network.extract_features(
            self.inputs, batch_size=self.batch_size, tta_flip=False, workers=self.workers
        )

    def _eval_rows(self, rows: np.ndarray) -> np.ndarray:
        subset = getattr(self.inputs, "subset", None)
        inputs = subset(rows) if callable(subset) else self.inputs[rows]
        return self.network.extract_features(
            inputs, batch_size=self.batch_size, tta_flip=False, workers=self.workers
        )

    @torch.no_grad()
    def as_trained(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Features of every training item (or of ``rows``) as the training loss sees them
        (BatchNorm on batch statistics); BatchNorm running statistics are left as they were.
        Early in training the running statistics are far from the batch statistics, so
        eval-mode features would put the codebooks where the training features are not."""
        if rows is None and self.dist is not None:
            return self._gathered(self.as_trained)
        model = self.network
        saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
        was_training = model.training
        model.train()
        size = self.batch_size
        count = len(self) if rows is None else len(rows)
        out = np.empty((count, model.feature_dim), dtype=np.float32)
        if rows is None:
            batches = self.reader.sequential(size)
        else:
            parts = [rows[start : start + size] for start in range(0, count, size)]
            batches = zip(range(0, count, size), self.reader.read(parts), strict=True)
        try:
            with autocast(model.device, self.precision):
                for start, raw in batches:
                    x = model.prepare_inputs(raw.to(model.device, non_blocking=True))
                    features = model.forward_features(x).float().cpu().numpy()
                    out[start : start + len(features)] = features
        finally:
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])
            model.train(was_training)
        return out

    def _gathered(self, features_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Features of every training row, computed by the ranks in turns of rows
        (``features_of(rows)`` on this rank's share) and gathered on all ranks."""
        if self.dist is None:
            raise ValueError("gathering features needs a multi-process run.")
        rows = ddp.rank_rows(len(self), self.dist)
        local = features_of(rows)
        every_row = ddp.all_gather_rows(rows, self.dist, "gathering the k-means features")
        gathered = ddp.all_gather_rows(local, self.dist, "gathering the k-means features")
        out = np.empty_like(gathered)
        out[every_row] = gathered
        return out


def initialise_codebooks(
    method: RetrievalMethod,
    network: RetrievalNetwork,
    features: np.ndarray,
    dist: DistributedContext | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> list[float]:
    """The method's codebook initialisation on float32 (N, D) ``features``, on rank 0 of a
    multi-process run with the codebooks then broadcast to every rank; logs the method's
    line and returns its per-level errors."""

    def fit() -> list[float]:
        return [float(e) for e in method.init_codebooks(network, features)]

    errors = ddp.rank0_decides(dist, fit, "k-means on rank 0")
    if dist is not None:
        codebooks = list(method.codebook_parameters(network).values())
        ddp.broadcast_tensors_(codebooks, dist, "broadcasting the codebooks")
    log(method.describe_init(len(features), errors))
    return errors
