"""The model behind image queries and adds: loaded for an index (checked against its
codebooks) with the image size it reads, and run on one thread that batches the images of
every waiting request (:class:`BatchingEncoder`; image queries wait for it on the event
loop, not on a worker thread, so that every waiting query is in the next pass)."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dpq.serve.labels import predicted_labels

if TYPE_CHECKING:
    from dpq.index import DPQIndex
    from dpq.serve.settings import ServeSettings

__all__ = ["AutocastModel", "BatchingEncoder", "EngineModel", "ServedModel", "load_served_model"]


class EngineModel:
    """An inference engine (:mod:`dpq.inference`) in the place of the model: features only
    (an exported encoder has no classifier output, so there are no predicted labels).

    Args:
        engine: a :class:`~dpq.inference.engines.FeatureEngine` that reads images.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def extract_features(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """float32 (n, D) features of uint8 (n, H, W, 3) images, in the engine's batches."""
        return self.engine.features(images)


class AutocastModel:
    """The model in torch at ``precision`` ("bf16", "fp16": autocast), features and logits
    both (so image queries keep their predicted labels).

    Args:
        network: a loaded :class:`~dpq.model.retrieval_network.RetrievalNetwork`.
        precision: passed to its ``extract_features`` / ``extract_features_and_logits``.
    """

    def __init__(self, network: Any, precision: str) -> None:
        self.network = network
        self.precision = precision

    def extract_features(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """float32 (n, D) features of uint8 (n, H, W, 3) images."""
        return self.network.extract_features(
            images, batch_size=batch_size, precision=self.precision
        )

    def extract_features_and_logits(
        self, images: np.ndarray, batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray]:
        """float32 (n, D) features and (n, C) classifier logits of uint8 (n, H, W, 3) images."""
        return self.network.extract_features_and_logits(
            images, batch_size=batch_size, precision=self.precision
        )


class BatchingEncoder:
    """Runs the model on one thread, batching the images of every request waiting for it.

    Concurrent requests each put their images in a queue; the thread takes what is queued
    (up to ``max_batch`` images) and runs one forward pass for all of them, so 50 clients
    cost a few large batches instead of 50 small ones, without any waiting window.

    Args:
        model: anything with ``extract_features(uint8 (N, H, W, 3), batch_size=...)``
            returning float32 (N, D), and optionally ``extract_features_and_logits`` (the
            same, with the classifier's float32 (N, C) logits).
        max_batch: images per forward pass at most (one request's images are never split).
    """

    def __init__(self, model: Any, max_batch: int = 64) -> None:
        self._model = model
        self._max_batch = max_batch
        self._queue: queue.Queue[tuple[np.ndarray, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="dpq-encoder", daemon=True)
        self._thread.start()

    def features(self, images: np.ndarray) -> np.ndarray:
        """float32 (n, D) features of uint8 (n, H, W, 3) images."""
        return self.features_and_logits(images)[0]

    def features_and_logits(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 (n, D) features and float32 (n, C) classifier logits of uint8 (n, H, W, 3)
        images (logits None for a model without ``extract_features_and_logits``)."""
        return self.submit(images).result()

    def submit(self, images: np.ndarray) -> Future:
        """Queue uint8 (n, H, W, 3) images for the next forward pass without waiting: a
        Future of what :meth:`features_and_logits` returns. The service awaits it on its
        event loop (``asyncio.wrap_future``), so that no worker thread is held while the
        images wait, and the pass batches every request that is waiting."""
        done: Future = Future()
        self._queue.put((images, done))
        return done

    def predictions(
        self, images: np.ndarray, multi_label: bool, classes: Sequence[str] | None
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """float32 (n, D) features of images, and per image what the model's classifier
        predicts (:func:`dpq.serve.labels.predicted_labels`; {} without a classifier)."""
        features, logits = self.features_and_logits(images)
        return features, predictions_of(logits, len(images), multi_label, classes)

    def _forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        size = max(len(batch), 1)
        if hasattr(self._model, "extract_features_and_logits"):
            return self._model.extract_features_and_logits(batch, batch_size=size)
        return self._model.extract_features(batch, batch_size=size), None

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            count = len(first[0])
            while count < self._max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)
                    break
                jobs.append(job)
                count += len(job[0])
            try:
                batch = np.concatenate([images for images, _ in jobs])
                feats, logits = self._forward(batch)
            except BaseException as exc:  # hand the error to every waiting request
                for _, done in jobs:
                    done.set_exception(exc)
                continue
            start = 0
            for images, done in jobs:
                stop = start + len(images)
                done.set_result((feats[start:stop], None if logits is None else logits[start:stop]))
                start = stop

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)


def predictions_of(
    logits: np.ndarray | None, count: int, multi_label: bool, classes: Sequence[str] | None
) -> list[dict[str, Any]]:
    """Per image what the classifier predicts from float32 (count, C) ``logits``
    (:func:`dpq.serve.labels.predicted_labels`); ``count`` empty dicts without a classifier."""
    if logits is None:
        return [{} for _ in range(count)]
    return predicted_labels(logits, multi_label, classes)


@dataclass(frozen=True)
class ServedModel:
    """A loaded model for a collection: the DPQModel, JSON-ready facts about it for the
    service's stats, and the (height, width) of the images it reads."""

    model: Any
    info: dict[str, Any]
    image_size: tuple[int, int]


def _model_facts(model_path: Path) -> dict[str, Any]:
    facts: dict[str, Any] = {"name": model_path.name}
    try:
        record = json.loads((model_path / "config.json").read_text())
        facts["weights_sha256"] = record["checkpoint"]["weights_sha256"]
        facts["backbone"] = record["model"]["backbone"]
        facts["feature"] = record["model"].get("feature")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return facts


def load_served_model(
    settings: ServeSettings, index: DPQIndex, source_size: tuple[int, int] | None = None
) -> ServedModel:
    """The model of ``settings.model`` on ``settings.device`` (torch threads set to
    ``settings.model_threads`` when given), checked to read images and to share the index's
    codebooks. Its image size: ``settings.image_size``, else the size it was trained on,
    else ``source_size`` (height, width of the served image source); ValueError when none
    is known. With ``settings.engine`` "onnxruntime" or "openvino" the network runs in that
    engine (:func:`dpq.inference.engine_for`, on the CPU, ``model_threads`` threads) at that
    image size, wrapped in an :class:`EngineModel`; torch at an ``engine_precision`` other
    than fp32 runs in an :class:`AutocastModel`."""
    from dpq.devices import resolve_device
    from dpq.model.network import DPQModel

    model_path = settings.model
    if model_path is None:
        raise ValueError("the settings name no model to load; set model to a checkpoint.")
    device = "cpu" if settings.engine != "torch" else settings.device
    model = DPQModel.from_checkpoint(model_path, device=resolve_device(device))
    if settings.model_threads is not None and settings.engine == "torch":
        import torch

        torch.set_num_threads(settings.model_threads)
    if model.input_kind != "images":
        raise ValueError(
            f"{model_path} reads feature vectors, not images; serve its index without "
            "--model and query with vectors."
        )
    index.check_compatible(model.codebooks(), source=f"model {model_path}")
    trained_size = model.config.model.image_size
    if settings.image_size is not None:
        size = (settings.image_size, settings.image_size)
    elif trained_size is not None:  # the model resizes to it anyway
        size = (int(trained_size), int(trained_size))
    elif source_size is not None:
        size = source_size
    else:
        raise ValueError(
            "with --model and no --images, give --image-size: the size the model was "
            "trained on (e.g. 32 for CIFAR-10)."
        )
    facts = {
        **_model_facts(model_path),
        "engine": settings.engine,
        "engine_precision": settings.engine_precision,
    }
    if settings.engine == "torch":
        if settings.engine_precision != "fp32":
            model = AutocastModel(model, settings.engine_precision)
        return ServedModel(model, facts, size)
    from dpq.inference.engines import engine_for

    engine = engine_for(
        model,
        model_path,
        settings.engine,
        settings.onnx,
        inputs=np.zeros((0, *size, 3), np.uint8),
        batch_size=64,
        threads=settings.model_threads,
        precision=settings.engine_precision,
    )
    return ServedModel(EngineModel(engine), facts, size)
