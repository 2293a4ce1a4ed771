"""The flows behind ``dpq train`` and ``dpq demo`` (``dpq reproduce``: :mod:`.reproduce`).

Each is the same four steps, written once in :func:`prepare_run` and :func:`train_run`:
load a source, split it, complete the config from the data, resolve the label word vectors
(when the config's method asks for them); then, holding the run folder's lock, check that
the folder may be used, write the split, and train. The run's settings travel in a
:class:`RunSettings` (where it goes, its word vectors, resume, hardware, output) and, for
``dpq train``, a :class:`SplitSettings` (which rows train).

- :func:`train_from_source`: ``dpq train``, a model of any method from a
  :class:`~dpq.data.SourceSpec`.
- :func:`run_demo`: the digits end to end in about a minute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpq.config import DPQConfig
from dpq.data import (
    Source,
    SourceSpec,
    Split,
    load_source,
    resolve_word_vectors,
    split_per_class,
)
from dpq.evaluate.results import RetrievalEvaluation
from dpq.evaluate.workflows import evaluate_split
from dpq.methods import method_for
from dpq.training import ddp
from dpq.training.checkpoints import RunDirectory, RunInProgressError
from dpq.training.loop import ArrayDataset, TrainResult, train_model

SPLIT_FILE = "split.json"
SPLIT_CHOICES = ("auto", "all", "per-class")


@dataclass(frozen=True)
class RunSettings:
    """Where and how a training run goes (what ``dpq train`` and ``dpq reproduce`` share).

    Attributes:
        out_dir: the run folder (checkpoints, model, split, log).
        word_vectors: a word-vector file, "orthogonal" (seeded orthonormal class vectors),
            or None; read when the config's method needs them (DPQ's semantic loss).
        resume: continue the interrupted run in ``out_dir``.
        progress: progress bars and log lines on stderr.
        log: where log lines go (default: stderr).
        device: where to train ("auto", "cpu", "cuda", "cuda:N", "mps").
        workers: processes decoding images read on demand (default: one per core, up to 8).
    """

    out_dir: str | Path
    word_vectors: str | Path | None = None
    resume: bool = False
    progress: bool = True
    log: Callable[[str], None] | None = None
    device: str = "cpu"
    workers: int | None = None

    def say(self) -> Callable[[str], None]:
        """The log: ``log``, else one line on stderr."""
        return self.log or (lambda message: print(message, file=sys.stderr, flush=True))


@dataclass(frozen=True)
class SplitSettings:
    """Which rows train (``dpq train``'s split flags; see :func:`prepare_run`).

    Attributes:
        split: "auto", "all", "per-class" or a ready :class:`~dpq.data.Split`.
        train_per_class, query_per_class: the per-class draw.
        seed: seed of the per-class draw.
    """

    split: str | Split = "auto"
    train_per_class: int = 500
    query_per_class: int = 100
    seed: int = 0


def complete_config(config: DPQConfig, source: Source, train_inputs: Any) -> DPQConfig:
    """Fill the data-dependent fields of ``config``.

    Sets ``model.num_classes`` and ``model.multilabel`` from the source's labels; for
    images, when the config still has the generic mean/std: the backbone's (ImageNet's for
    the ImageNet networks, :func:`dpq.model.backbones.input_defaults`) or else the per-channel
    mean/std of the training images; ``model.image_size`` from the backbone when unset;
    for features (float (N, F)), the identity backbone with ``in_features = F``.
    """
    from dpq.config import ModelConfig
    from dpq.model.backbones import input_defaults
    from dpq.model.retrieval_network import image_statistics

    updates: dict[str, Any] = {
        "num_classes": source.num_classes,
        "multilabel": source.is_multilabel,
    }
    defaults = ModelConfig()
    if source.kind == "features":
        updates["backbone"] = "identity"
        updates["backbone_kwargs"] = {"in_features": int(train_inputs.shape[1])}
    else:
        expected = input_defaults(config.model.backbone)
        generic = (
            config.model.image_mean == defaults.image_mean
            and config.model.image_std == defaults.image_std
        )
        if generic and expected is not None:
            updates["image_mean"], updates["image_std"] = expected.mean, expected.std
        elif generic:
            mean, std = image_statistics(train_inputs)
            updates["image_mean"], updates["image_std"] = mean, std
        if expected is not None and config.model.image_size is None:
            updates["image_size"] = expected.image_size
    return config.replace(model=updates)


def check_backbone_weights(config: DPQConfig) -> None:
    """FileNotFoundError, before any loading or writing, when ``train.backbone_weights``
    names a file that does not exist."""
    path = config.train.backbone_weights
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist; pass a local .safetensors or .pth file "
            "(nothing is downloaded)."
        )


def model_image_size(config: DPQConfig) -> int | None:
    """The side the config's network reads (``model.image_size``, else its backbone's), the
    size to decode a collection of differently sized images at; None where it has none."""
    from dpq.model.backbones import input_defaults

    if config.model.image_size is not None:
        return config.model.image_size
    expected = input_defaults(config.model.backbone)
    return expected.image_size if expected is not None else None


@dataclass
class PreparedRun:
    """What a training run starts from.

    Attributes:
        config: the recipe completed from the data (:func:`complete_config`).
        train_data: the training inputs and labels.
        word_vectors: float32 (C, D) label word vectors, or None (the method needs none).
        split: the protocol split the training rows come from, or None (all items).
        source: the loaded source.
    """

    config: DPQConfig
    train_data: ArrayDataset
    word_vectors: np.ndarray | None
    split: Split | None
    source: Source


def prepare_run(
    config: DPQConfig,
    source: Source,
    split: str | Split = "auto",
    train_per_class: int = 500,
    query_per_class: int = 100,
    split_seed: int = 0,
    word_vectors: str | Path | None = None,
) -> PreparedRun:
    """Split a loaded source, complete the config from its data, resolve the word vectors.

    Args:
        config: the recipe.
        source: from :func:`dpq.data.load_source`.
        split: "all" (train on everything), "per-class" (``train_per_class`` /
            ``query_per_class`` per class, seed ``split_seed``), "auto" (per-class for
            CIFAR-10, else all), or a ready :class:`~dpq.data.Split`.
        word_vectors: a word-vector file, "orthogonal" (seeded orthonormal class vectors),
            or None; required when the config's method needs them
            (:attr:`~dpq.methods.base.RetrievalMethod.uses_word_vectors`, DPQ's semantic loss).
    """
    if isinstance(split, Split):
        chosen: Split | None = split
    elif split not in SPLIT_CHOICES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_CHOICES)}; got {split!r}.")
    elif split == "per-class" or (split == "auto" and source.kind == "cifar10"):
        if source.is_multilabel:
            raise ValueError("a per-class split needs single-label data; use --split all.")
        chosen = split_per_class(
            source.labels, train_per_class, query_per_class, split_seed, classes=source.classes
        )
    else:
        chosen = None
    if chosen is None:
        train_inputs, train_labels = source.inputs, source.labels
    else:
        train_inputs, train_labels = source.rows(chosen.rows("train", len(source), source.name))
    if isinstance(train_inputs, list):
        train_inputs = np.asarray(train_inputs)
    config = complete_config(config, source, train_inputs)
    method = method_for(config)
    if method.uses_word_vectors and word_vectors is None:
        raise ValueError(
            f"the {method.name} method's loss (DPQ: the semantic loss) needs one word vector "
            "per class: pass --word-vectors PATH, or --word-vectors orthogonal (seeded "
            "orthonormal class vectors), or switch the semantic loss off (--ablation E+LC)."
        )
    vectors = (
        resolve_word_vectors(
            word_vectors, config.model.num_classes, config.quantizer.dim, config.train.seed
        )
        if method.uses_word_vectors
        else None
    )
    return PreparedRun(config, ArrayDataset(train_inputs, train_labels), vectors, chosen, source)


def train_run(prepared: PreparedRun, run: RunSettings) -> TrainResult:
    """Train a prepared run into ``run.out_dir`` on ``run.device``
    (:func:`dpq.devices.resolve_device`) with ``run.workers`` data-loading processes for
    images read on demand: lock the folder, check it, write the split (``split.json``),
    train. Nothing is written before the checks pass. (``run.word_vectors`` is not read:
    the prepared run holds them.)"""
    from dpq.devices import resolve_device

    # under torchrun: rank 0 locks, checks and writes the folder; every rank trains
    distributed = ddp.init_from_environment(resolve_device(run.device).type)
    run_dir = RunDirectory(run.out_dir)
    resume = run.resume
    with contextlib.ExitStack() as stack:

        def claim_folder() -> None:
            stack.enter_context(run_dir.lock())
            run_dir.check_can_start(resume)
            if not resume:
                check_backbone_weights(prepared.config)
            split_path = run_dir.path / SPLIT_FILE
            if prepared.split is not None:
                if resume and split_path.is_file() and Split.load(split_path) != prepared.split:
                    raise ValueError(
                        f"cannot resume: {split_path} holds another split than this run's "
                        "(other --split-seed or per-class counts, or another source); resume "
                        "with the same split settings."
                    )
                prepared.split.save(split_path)

        kinds = (RunInProgressError, ValueError, FileNotFoundError)
        ddp.rank0_decides(distributed, claim_folder, "checking the run folder", kinds=kinds)
        return train_model(
            prepared.config,
            prepared.train_data,
            prepared.word_vectors,
            run_dir,
            resume=resume,
            progress=run.progress,
            log=run.log,
            device=run.device,
            workers=run.workers,
            distributed=distributed,
        )


def check_run_can_start(config: DPQConfig, run: RunSettings) -> None:
    """Before any loading: the device exists, the folder can be written and started (or
    resumed), the method's settings hold (:func:`dpq.methods.method_for`) and the backbone
    weights file exists (a fresh run)."""
    from dpq.devices import resolve_device

    resolve_device(run.device)  # a missing GPU is said before anything else
    run_dir = RunDirectory(run.out_dir)
    run_dir.check_writable()  # checked again, under the lock, by train_run
    run_dir.check_can_start(run.resume)
    method_for(config)
    if not run.resume:
        check_backbone_weights(config)


def train_from_source(
    config: DPQConfig, source: SourceSpec, run: RunSettings, split: SplitSettings | None = None
) -> TrainResult:
    """Load a source, split it, complete the config from the data and train a model of the
    config's method (``dpq train``).

    Args:
        config: the recipe; its ``method`` section names the method (DPQ by default).
        source: the labelled collection: images, or features with labels.
        run: the run folder, word vectors, resume, hardware and output.
        split: which rows train (default: "auto", per-class 500/100 for CIFAR-10).

    Without ``source.image_size``, images read on demand are decoded at the size the
    network reads (:func:`model_image_size`).
    """
    from dpq.data.sources import loading_mode

    split = split or SplitSettings()
    check_run_can_start(config, run)
    if source.images is not None and source.image_size is None:
        if loading_mode(source.loading) is not True:
            source = dataclasses.replace(source, image_size=model_image_size(config))
    loaded = source.load(progress=run.progress)
    if loaded.skipped:
        run.say()(f"training without the {loaded.skipped:,} images that could not be decoded")
    prepared = prepare_run(
        config,
        loaded,
        split.split,
        split.train_per_class,
        split.query_per_class,
        split.seed,
        run.word_vectors,
    )
    return train_run(prepared, run)


# ---------------------------------------------------------------------------- demo


@dataclass
class DemoResult:
    """What :func:`run_demo` returns.

    Attributes:
        split: the sizes of the digits split and its seed.
        settings: the model settings shown in the summary.
        evaluation: mAP at every code length and the diagnostics.
        train: the training run.
        wall_seconds: {"train", "total"}.
    """

    split: dict[str, int]
    settings: dict[str, Any]
    evaluation: RetrievalEvaluation
    train: TrainResult
    wall_seconds: dict[str, float]
    dataset: str = "sklearn digits (8x8)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "settings": self.settings,
            "evaluation": self.evaluation.to_dict(),
            "wall_seconds": self.wall_seconds,
        }


def run_demo(
    out_dir: str | Path | None = None,
    epochs: int = 15,
    train_per_class: int = 50,
    query_per_class: int = 10,
    num_levels: int = 4,
    codebook_size: int = 256,
    dim: int = 64,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Digits end to end: split per class, train a small CNN with DPQ, encode the rest as the
    database, search it with AQD, score mAP@(database size) at every code length.

    The digits have no word vectors: the semantic loss uses seeded orthonormal class vectors
    (:func:`dpq.data.orthogonal_label_embeddings`).
    """
    import tempfile

    from dpq.config import LossConfig, ModelConfig, QuantizerConfig, TrainConfig

    started = time.perf_counter()
    config = DPQConfig(
        model=ModelConfig(backbone="small_cnn"),
        quantizer=QuantizerConfig(num_levels=num_levels, codebook_size=codebook_size, dim=dim),
        loss=LossConfig(),
        train=TrainConfig(
            epochs=epochs,
            batch_size=32,
            lr=0.05,
            crop_pad=1,
            flip=False,
            seed=seed,
            keep_checkpoints=1,
        ),
    )
    source = load_source("digits")
    prepared = prepare_run(
        config, source, "per-class", train_per_class, query_per_class, seed, "orthogonal"
    )
    split = prepared.split
    assert split is not None
    with tempfile.TemporaryDirectory(prefix="dpq-demo-") as scratch:
        target = Path(out_dir) if out_dir is not None else Path(scratch)
        result = train_run(prepared, RunSettings(target, progress=progress, log=log))
        evaluation = evaluate_split(result.model, source, split, progress=False)
    return DemoResult(
        split={**split.sizes, "seed": seed},
        settings={
            "backbone": "small_cnn",
            "num_levels": num_levels,
            "codebook_size": codebook_size,
            "dim": dim,
            "epochs": result.epochs,
        },
        evaluation=evaluation,
        train=result,
        wall_seconds={
            "train": round(result.wall_seconds, 2),
            "total": round(time.perf_counter() - started, 2),
        },
    )
