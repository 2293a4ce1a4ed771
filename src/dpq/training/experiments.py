"""The flows behind ``dpq train``, ``dpq demo`` and ``dpq reproduce``.

Each is the same four steps, written once in :func:`prepare_run` and :func:`train_run`:
load a source, split it, complete the config from the data, resolve the label word vectors;
then, holding the run folder's lock, check that the folder may be used, write the split,
and train.

- :func:`train_from_source`: ``dpq train``.
- :func:`run_demo`: the digits end to end in about a minute.
- :func:`reproduce_cifar10`: the paper's CIFAR-10 protocol with one model, results + report.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpq.atomic import write_json_atomic, write_text_atomic
from dpq.config import DPQConfig
from dpq.data import (
    Source,
    Split,
    detect_source_kind,
    load_source,
    resolve_word_vectors,
    split_per_class,
)
from dpq.evaluate.retrieval import RetrievalEvaluation
from dpq.evaluate.workflows import evaluate_split
from dpq.training import ddp
from dpq.training.checkpoints import RunDirectory, RunInProgressError
from dpq.training.loop import ArrayDataset, TrainResult, train_model

SPLIT_FILE = "split.json"
SPLIT_CHOICES = ("auto", "all", "per-class")


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
        word_vectors: float32 (C, D) label word vectors, or None (no semantic loss).
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
            or None; required when the config's semantic loss is on.
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
    if config.loss.use_semantic and word_vectors is None:
        raise ValueError(
            "the semantic loss needs one word vector per class: pass --word-vectors PATH, "
            "or --word-vectors orthogonal (seeded orthonormal class vectors), or switch "
            "the semantic loss off (--ablation E+LC)."
        )
    vectors = (
        resolve_word_vectors(
            word_vectors, config.model.num_classes, config.quantizer.dim, config.train.seed
        )
        if config.loss.use_semantic
        else None
    )
    return PreparedRun(config, ArrayDataset(train_inputs, train_labels), vectors, chosen, source)


def train_run(
    prepared: PreparedRun,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    device: str = "cpu",
    workers: int | None = None,
) -> TrainResult:
    """Train a prepared run into ``out_dir`` on ``device`` (:func:`dpq.devices.resolve_device`)
    with ``workers`` data-loading processes for images read on demand: lock the folder,
    check it, write the split (``split.json``), train. Nothing is written before the checks
    pass."""
    from dpq.devices import resolve_device

    # under torchrun: rank 0 locks, checks and writes the folder; every rank trains
    distributed = ddp.init_from_environment(resolve_device(device).type)
    run_dir = RunDirectory(out_dir)
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
            progress=progress,
            log=log,
            device=device,
            workers=workers,
            distributed=distributed,
        )


def train_from_source(
    config: DPQConfig,
    out_dir: str | Path,
    source: str | Path | None = None,
    features: str | Path | None = None,
    labels: str | Path | None = None,
    image_root: str | Path | None = None,
    image_size: int | None = None,
    skip_corrupt: bool = False,
    split: str | Split = "auto",
    train_per_class: int = 500,
    query_per_class: int = 100,
    split_seed: int = 0,
    word_vectors: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    device: str = "cpu",
    workers: int | None = None,
    in_memory: bool | str = True,
) -> TrainResult:
    """Load a source, split it, complete the config from the data and train (``dpq train``).

    Arguments as in :func:`dpq.data.load_source`, :func:`prepare_run` and :func:`train_run`.
    Without ``image_size``, a folder read on demand is decoded at the size its network reads
    (:func:`model_image_size`).
    """
    from dpq.devices import resolve_device

    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    run_dir = RunDirectory(out_dir)
    run_dir.check_writable()  # before any work; checked again, under the lock, by train_run
    run_dir.check_can_start(resume)
    resolve_device(device)  # a missing GPU is said before the minutes of loading
    if not resume:
        check_backbone_weights(config)
    if image_size is None and source is not None and in_memory is not True:
        image_size = model_image_size(config)
    loaded = load_source(
        source,
        features=features,
        labels=labels,
        image_root=image_root,
        image_size=image_size,
        skip_corrupt=skip_corrupt,
        progress=progress,
        in_memory=in_memory,
    )
    if loaded.skipped:
        say(f"training without the {loaded.skipped:,} images that could not be decoded")
    prepared = prepare_run(
        config, loaded, split, train_per_class, query_per_class, split_seed, word_vectors
    )
    return train_run(
        prepared, out_dir, resume=resume, progress=progress, log=log, device=device, workers=workers
    )


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
        result = train_run(prepared, target, progress=progress, log=log)
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


# ---------------------------------------------------------------------------- reproduce

PAPER_CIFAR10_DPQ = {8: 0.814, 16: 0.833, 24: 0.834, 32: 0.831}
"""The paper's DPQ row on CIFAR-10 (mAP@54000; ImageNet-pretrained AlexNet on a GPU)."""


@dataclass
class ReproduceResult:
    """What :func:`reproduce_cifar10` returns (and writes as ``results.json``).

    Attributes:
        evaluation: mAP@54000 at every code length, float features, baselines, diagnostics.
        train: the training run (model, epochs, history, plan).
        ablation: the Table 2 configuration trained.
        split_seed: the seed of the protocol split.
        protocol: the protocol in words.
        wall_seconds: {"load", "train", "features", "encode", "search", "total"}.
        command: the command line, when given.
    """

    evaluation: RetrievalEvaluation
    train: TrainResult
    ablation: str
    split_seed: int
    protocol: str
    wall_seconds: dict[str, float]
    command: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return self.train.epochs

    def to_dict(self) -> dict[str, Any]:
        config = self.train.model.config
        return {
            "dataset": "cifar10",
            "protocol": self.protocol,
            "ablation": self.ablation,
            "split_seed": self.split_seed,
            "command": self.command,
            "config": config.to_dict(),
            "epochs": self.train.epochs,
            "plan": self.train.planned,
            "precision": self.train.precision,
            "time_budget_minutes": config.train.time_budget_minutes,
            "evaluation": self.evaluation.to_dict(),
            "wall_seconds": self.wall_seconds,
            "model_dir": str(self.train.model_dir),
            "resumed_from_epoch": self.train.resumed_from_epoch,
            **self.extra,
        }


def _default_cifar10_word_vectors(data: str | Path | None) -> Path | None:
    """``<data>/../../wordvec/cifar10.txt`` when it exists (the offline shared-data layout)."""
    if data is None:
        return None
    candidate = Path(data).resolve().parent.parent / "wordvec" / "cifar10.txt"
    return candidate if candidate.is_file() else None


def reproduce_cifar10(
    out_dir: str | Path,
    data: str | Path | None = None,
    ablation: str = "full",
    base_config: DPQConfig | None = None,
    minutes: float | None = None,
    epochs: int | None = None,
    word_vectors: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
    baselines: tuple[str, ...] | list[str] = (),
    train_per_class: int = 500,
    query_per_class: int = 100,
    split_seed: int = 0,
    device: str = "cpu",
    workers: int | None = None,
) -> ReproduceResult | None:
    """The CIFAR-10 protocol of the paper with one model: merge the 60,000 images, draw 500
    training and 100 query images per class (seed ``split_seed``), train on the 5,000, encode
    the other 54,000 as the database, search it for all 1,000 queries and report mAP@54000 at
    every code length (8/16/24/32 bits for L = 4, K = 256).

    Writes ``results.json``, ``results.md`` and ``report/`` (report.md, PR and precision@R
    figures) beside the run (checkpoints, model, log, split) into ``out_dir``.

    Args:
        out_dir: output directory.
        data: CIFAR-10 source for :func:`dpq.data.load_cifar10` (None: download / cache).
        ablation: a name from :data:`dpq.recipes.ABLATIONS`.
        base_config: the recipe (default :func:`dpq.recipes.cifar10_recipe`); the ablation
            modifies it.
        minutes: training time budget (overrides the recipe's epochs).
        epochs: fixed number of epochs (overrides the recipe).
        word_vectors: the CIFAR-10 word-vector file (default: found beside the data).
        resume: continue an interrupted run in ``out_dir``.
        command: the command line, recorded in the results.
        baselines: names of :data:`dpq.evaluate.baselines.BASELINES` evaluated on the same features
            (fitted on the training features) beside DPQ in the report.
        train_per_class, query_per_class: the protocol's 500 and 100; smaller values make a
            quick smoke run, not the benchmark.
        split_seed: seed of the per-class split (the paper's protocol draws one at random).
        device: where to train and encode ("auto", "cpu", "cuda", "cuda:N", "mps").
        workers: processes decoding images read on demand (none here: this flow holds
            CIFAR-10's 32 px images in memory, where batches are cut in this process).

    Under torchrun every process trains (:class:`dpq.training.loop.Trainer`); rank 0 then
    evaluates and writes the results, and the other ranks return None.
    """
    from dpq.devices import resolve_device
    from dpq.recipes import ablation_config, cifar10_recipe

    resolve_device(device)  # a missing GPU is said before anything else

    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if minutes is not None and epochs is not None:
        raise ValueError("give either minutes (a time budget) or epochs, not both.")
    started = time.perf_counter()
    out = Path(out_dir)
    config = ablation_config(ablation, base_config or cifar10_recipe())
    if minutes is not None:
        config = config.replace(train={"time_budget_minutes": float(minutes)})
    if epochs is not None:
        config = config.replace(train={"epochs": int(epochs), "time_budget_minutes": None})
    run_dir = RunDirectory(out)
    run_dir.check_writable()  # before the minutes of loading and training
    run_dir.check_can_start(resume)
    if data is not None and detect_source_kind(data) != "cifar10":
        raise ValueError(
            f"{data} is a {detect_source_kind(data)} source, not CIFAR-10: give the official "
            "archive, its extracted folder, or a folder/zip of <train|test>/<class>/<image>."
        )
    if config.loss.use_semantic:
        word_vectors = word_vectors or _default_cifar10_word_vectors(data)
        if word_vectors is None:
            raise ValueError(
                "the semantic loss needs the CIFAR-10 word vectors (10 x 300); pass "
                "--word-vectors PATH (e.g. shared/data/wordvec/cifar10.txt), or pick an "
                "ablation without it (E, E+LC)."
            )
    if not resume:
        check_backbone_weights(config)
    begin = time.perf_counter()
    source = load_source(data if data is not None else _download_cifar10(), progress=progress)
    split = split_per_class(
        source.labels, train_per_class, query_per_class, seed=split_seed, classes=source.classes
    )
    prepared = prepare_run(config, source, split, word_vectors=word_vectors)
    load_seconds = time.perf_counter() - begin
    say(
        f"CIFAR-10: {len(source)} images; split per class {train_per_class}/"
        f"{query_per_class} (seed {split_seed}): "
        f"{len(split.train)} train, {len(split.query)} query, {len(split.database)} database"
    )
    result = train_run(
        prepared, out, resume=resume, progress=progress, log=say, device=device, workers=workers
    )
    if not result.is_main:  # under torchrun: rank 0 evaluates and writes the results
        return None
    say(f"encoding {len(split.database)} database images and searching {len(split.query)} queries")
    evaluation = evaluate_split(
        result.model,
        source,
        split,
        baselines=baselines,
        curves=True,
        progress=progress,
        workers=workers,
    )
    search = "AQD" if result.model.config.model.search_mode == "aqd" else "inner-product search"
    reproduced = ReproduceResult(
        evaluation=evaluation,
        train=result,
        ablation=ablation,
        split_seed=split_seed,
        protocol=f"all {len(source):,} images; per class {train_per_class} train / "
        f"{query_per_class} query (seed {split_seed}); database = the other "
        f"{len(split.database):,}; mAP@{evaluation.r} with {search} over the codes",
        wall_seconds={
            "load": round(load_seconds, 2),
            "train": round(result.wall_seconds, 2),
            **evaluation.seconds,
            "total": round(time.perf_counter() - started, 2),
        },
        command=command,
    )
    write_json_atomic(out / "results.json", reproduced.to_dict())
    write_text_atomic(out / "results.md", _results_markdown(reproduced))
    _write_cifar10_report(out / "report", reproduced)
    return reproduced


def _download_cifar10() -> Path:
    """The official CIFAR-10 archive in the cache, downloaded (md5-checked) when missing."""
    from dpq.data import download_cifar10

    return download_cifar10()


def _results_markdown(result: ReproduceResult) -> str:
    from dpq.evaluate.report import results_row_markdown

    evaluation = result.evaluation
    return "\n".join(
        [
            f"# CIFAR-10 mAP@{evaluation.r} (DPQ protocol, one model)",
            "",
            f"Command: `{result.command or 'dpq reproduce cifar10'}`",
            "",
            results_row_markdown(
                f"{result.ablation} (split seed {result.split_seed})",
                result.epochs,
                result.wall_seconds,
                evaluation,
            ),
            "",
        ]
    )


def _write_cifar10_report(folder: Path, result: ReproduceResult) -> None:
    """report.md + results.json + PR / precision@R figures via :func:`dpq.evaluate.report.write_report`."""
    from dpq.evaluate import report

    evaluation = result.evaluation
    details = evaluation.details
    assert details is not None
    map_table: dict[str, dict[int, float]] = dict(details.map_table())
    map_table["paper DPQ (IJCAI 2019)"] = dict(PAPER_CIFAR10_DPQ)
    folder.mkdir(parents=True, exist_ok=True)
    longest = max(evaluation.map_by_bits)
    pr, at_r = details.curves(longest)
    figures: dict[str, str | Path] = {}
    if pr:
        figures[f"Precision-recall, {longest} bits"] = report.plot_pr_curves(
            pr, folder / f"pr_{longest}bits.png"
        )
    if at_r:
        figures[f"Precision@R, {longest} bits"] = report.plot_precision_at_r(
            at_r, folder / f"precision_at_r_{longest}bits.png"
        )
    wall = result.wall_seconds
    timings = {
        "dpq training": {"train_s": wall["train"], "epochs": float(result.epochs)},
        **details.timings(),
    }
    notes = (
        f"Command: `{result.command or 'dpq reproduce cifar10'}`\n\n"
        f"Protocol: {result.protocol}. One model (ablation `{result.ablation}`, "
        f"{result.epochs} epochs, {result.train.precision}) gives every code length. Query "
        f"accuracy {evaluation.query_accuracy} (database {evaluation.database_accuracy}); "
        f"exact search on the float features: mAP {evaluation.float_map}; database ranked by "
        "the classifier's softmax probabilities (a fully class-collapsed reference): mAP "
        f"{evaluation.class_probability_map}. Wall time: {wall['total'] / 60:.1f} min in all."
    )
    report.write_report(
        folder,
        title=f"CIFAR-10, DPQ protocol (mAP@{evaluation.r})",
        map_table=map_table,
        timings=timings,
        figures=figures,
        notes=notes,
        extra={"run": result.to_dict()},
    )
