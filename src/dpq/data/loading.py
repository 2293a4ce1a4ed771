"""Reading a collection batch by batch: the one place where items become tensors.

:class:`BatchReader` gives the raw inputs of index batches, uint8 (B, H, W, 3) images or
float (B, F) feature rows, as CPU tensors:

- an in-memory array (``np.ndarray``: CIFAR-10, digits, a small folder loaded with
  ``load_source(..., in_memory=True)``) is indexed in the calling process, the fast path
  for small sets on a CPU;
- anything else that indexes like an array (an :class:`~dpq.data.ImageFileReader` that
  decodes and resizes on access) is read by a :class:`torch.utils.data.DataLoader` whose
  worker processes decode the images, at most ``workers * prefetch`` batches ahead, so
  memory stays bounded whatever the size of the collection.

Batches of the DataLoader go to pinned host memory when they are bound for a CUDA device
(its pinning thread overlaps with the network); in-memory batches are not pinned. Both
paths return the same batches for the same index batches: the order (a seeded
permutation) and every random augmentation are drawn in the calling process, never in a
worker. The index batches come from the caller (:class:`IndexBatches`, e.g. the trainer's
epoch order), which is where a distributed run would give each process its own share.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dpq.data.decode import CorruptImageError
from dpq.devices import default_workers, pin_memory

DEFAULT_PREFETCH = 2
"""Batches each worker decodes ahead of the consumer."""


def is_in_memory(inputs: Any) -> bool:
    """True for an in-memory array (read in the calling process by default)."""
    return isinstance(inputs, np.ndarray)


@dataclass(frozen=True)
class _Unreadable:
    """What a worker returns instead of an image it could not decode (re-raised by the
    calling process as the :class:`~dpq.data.CorruptImageError` naming the file)."""

    name: str
    reason: str


class ItemDataset(Dataset):
    """Map-style dataset over indexable inputs: ``dataset[i]`` is ``inputs[i]`` as an array
    (uint8 (H, W, 3) image or float (F,) row), decoded where it is called."""

    def __init__(self, inputs: Any) -> None:
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> np.ndarray | _Unreadable:
        try:
            return np.asarray(self.inputs[int(index)])
        except CorruptImageError as exc:
            return _Unreadable(exc.name, exc.reason)


def _stack(items: Sequence[np.ndarray | _Unreadable]) -> torch.Tensor | _Unreadable:
    for item in items:
        if isinstance(item, _Unreadable):
            return item
    return torch.from_numpy(np.stack(items))


class IndexBatches(Sampler[list[int]]):
    """The index batches of the next pass, set by the caller before each one
    (:meth:`set`); a DataLoader reads them in order."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def set(self, batches: Iterable[np.ndarray]) -> None:
        """The int64 index arrays of the next pass, in order."""
        self.batches = [np.asarray(batch, dtype=np.int64).reshape(-1) for batch in batches]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self.batches)


def sequential_batches(n: int, batch_size: int) -> list[np.ndarray]:
    """Index batches 0..n-1 in order, ``batch_size`` at a time (the last one shorter)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    return [np.arange(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


class BatchReader:
    """Raw input batches by index (see the module doc).

    Args:
        inputs: an in-memory array (uint8 (N, H, W, 3) or float (N, F)), or an object with
            ``len()`` and ``inputs[i]`` -> one item (e.g. :class:`~dpq.data.ImageFileReader`).
        workers: DataLoader worker processes for inputs read on demand (None:
            :func:`dpq.devices.default_workers`; 0: this process). An in-memory array is
            always indexed in this process, whatever ``workers`` says: slicing it costs
            less than handing batches between processes.
        device: where the batches go (pinned host memory for CUDA).
        prefetch: batches each worker reads ahead.

    Use as a context manager (or call :meth:`close`) to stop the workers; they are kept
    between passes (``persistent_workers``), so an epoch does not start new processes.
    """

    def __init__(
        self,
        inputs: Any,
        workers: int | None = None,
        device: torch.device | str = "cpu",
        prefetch: int = DEFAULT_PREFETCH,
    ) -> None:
        if workers is not None and (
            isinstance(workers, bool) or not isinstance(workers, int) or workers < 0
        ):
            raise ValueError(
                f"workers must be a whole number >= 0 (0 reads in this process); got {workers!r}."
            )
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be a positive integer; got {prefetch!r}.")
        self.inputs = inputs
        self.in_memory = is_in_memory(inputs)
        if workers is None:
            workers = default_workers()
        self.workers = 0 if self.in_memory else workers
        self.pin = pin_memory(device)
        self._sampler = IndexBatches()
        self._loader: DataLoader | None = None
        if not self.in_memory:
            self._loader = DataLoader(
                ItemDataset(inputs),
                batch_sampler=self._sampler,
                num_workers=self.workers,
                collate_fn=_stack,
                pin_memory=self.pin,
                persistent_workers=self.workers > 0,
                prefetch_factor=prefetch if self.workers > 0 else None,
            )

    @property
    def streams(self) -> bool:
        """True when batches come through the DataLoader (on demand, maybe in workers)."""
        return self._loader is not None

    def __len__(self) -> int:
        return len(self.inputs)

    def read(self, batches: Iterable[np.ndarray]) -> Iterator[torch.Tensor]:
        """The inputs of each index batch, in order, as CPU tensors (uint8 (B, H, W, 3) or
        float (B, F)).

        Raises:
            CorruptImageError: an image of a batch cannot be decoded (it names the file).
        """
        if self._loader is None:
            for batch in batches:
                index = np.asarray(batch, dtype=np.int64)
                # not pinned: a copy into pinned memory here would overlap with nothing
                yield torch.from_numpy(np.ascontiguousarray(self.inputs[index]))
            return
        self._sampler.set(batches)
        for tensor in self._loader:
            if isinstance(tensor, _Unreadable):
                raise CorruptImageError(tensor.name, tensor.reason)
            yield tensor

    def sequential(self, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, batch) over every item in order, ``batch_size`` at a time."""
        start = 0
        for tensor in self.read(sequential_batches(len(self.inputs), batch_size)):
            yield start, tensor
            start += len(tensor)

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`read` starts new ones)."""
        loader = self._loader
        if loader is not None and loader._iterator is not None:  # persistent workers
            shutdown = getattr(loader._iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            loader._iterator = None

    def __enter__(self) -> BatchReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass
