"""``dpq reproduce cifar10``: the paper's CIFAR-10 protocol with one model of any method.

Merge the 60,000 images, draw 500 training and 100 query images per class (a seeded split),
train one model on the 5,000 (the ``cifar10`` recipe, or the one given, with its method:
DPQ by default, or any registered method at its code length), encode the other 54,000 as
the database, search it for the 1,000 queries by the method's own distance and report
mAP@54000 at each of the method's code lengths. :func:`reproduce_cifar10` writes
``results.json``, ``results.md`` and ``report/`` beside the run.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpq.atomic import write_json_atomic, write_text_atomic
from dpq.config import DPQConfig
from dpq.data import Source, Split, detect_source_kind, load_source, split_per_class
from dpq.evaluate.results import RetrievalEvaluation
from dpq.evaluate.workflows import evaluate_split
from dpq.methods import method_for
from dpq.training.experiments import RunSettings, check_run_can_start, prepare_run, train_run
from dpq.training.loop import TrainResult

PAPER_CIFAR10_DPQ = {8: 0.814, 16: 0.833, 24: 0.834, 32: 0.831}
"""The paper's DPQ row on CIFAR-10 (mAP@54000; ImageNet-pretrained AlexNet on a GPU)."""


@dataclass(frozen=True)
class ReproduceSettings:
    """What one CIFAR-10 reproduction trains and reports (the run itself: :class:`RunSettings`).

    Attributes:
        data: CIFAR-10 source for :func:`dpq.data.load_cifar10` (None: download / cache).
        ablation: a name from :data:`dpq.recipes.ABLATIONS`.
        base_config: the recipe (default :func:`dpq.recipes.cifar10_recipe`), with its
            method section (e.g. ``.replace(method={"name": "sign", "bits": 16})``); the
            ablation modifies it.
        minutes: training time budget (overrides the recipe's epochs).
        epochs: fixed number of epochs (overrides the recipe).
        baselines: names of :data:`dpq.evaluate.baselines.BASELINES` evaluated on the same
            features (fitted on the training features) beside the model in the report.
        train_per_class, query_per_class: the protocol's 500 and 100; smaller values make a
            quick smoke run, not the benchmark.
        split_seed: seed of the per-class split (the paper's protocol draws one at random).
        command: the command line, recorded in the results.
    """

    data: str | Path | None = None
    ablation: str = "full"
    base_config: DPQConfig | None = None
    minutes: float | None = None
    epochs: int | None = None
    baselines: tuple[str, ...] | list[str] = ()
    train_per_class: int = 500
    query_per_class: int = 100
    split_seed: int = 0
    command: str | None = None

    def config(self) -> DPQConfig:
        """The recipe with the ablation and the training budget applied."""
        from dpq.recipes import ablation_config, cifar10_recipe

        if self.minutes is not None and self.epochs is not None:
            raise ValueError("give either minutes (a time budget) or epochs, not both.")
        config = ablation_config(self.ablation, self.base_config or cifar10_recipe())
        if self.minutes is not None:
            config = config.replace(train={"time_budget_minutes": float(self.minutes)})
        if self.epochs is not None:
            config = config.replace(train={"epochs": int(self.epochs), "time_budget_minutes": None})
        return config


@dataclass
class ReproduceResult:
    """What :func:`reproduce_cifar10` returns (and writes as ``results.json``).

    Attributes:
        evaluation: mAP@54000 at each code length, float features, baselines, diagnostics.
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

    @property
    def method(self) -> str:
        """The name of the model's method."""
        return self.evaluation.method

    def describe_codes(self) -> str:
        """The method, its code lengths and its search, in words."""
        lengths = ", ".join(str(bits) for bits in self.evaluation.map_by_bits)
        return f"`{self.method}`, codes of {lengths} bits searched by {self.evaluation.search}"

    def to_dict(self) -> dict[str, Any]:
        config = self.train.model.config
        return {
            "dataset": "cifar10",
            "method": self.method,
            "bits": list(self.evaluation.map_by_bits),
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


def reproduce_cifar10(protocol: ReproduceSettings, run: RunSettings) -> ReproduceResult | None:
    """The CIFAR-10 protocol of the paper with one model (module docstring): per class
    ``train_per_class`` training and ``query_per_class`` query images (seed ``split_seed``),
    the rest the database, mAP@(database size) at each of the model's code lengths (DPQ with
    L = 4, K = 256: 8/16/24/32 bits; another method: its ``method.bits``).

    Writes ``results.json``, ``results.md`` and ``report/`` (report.md, PR and precision@R
    figures) beside the run (checkpoints, model, log, split) into ``run.out_dir``. The word
    vectors default to ``<data>/../../wordvec/cifar10.txt`` when the method needs them. This
    flow holds CIFAR-10's 32 px images in memory (``run.workers`` decodes nothing here).

    Under torchrun every process trains (:class:`dpq.training.loop.Trainer`); rank 0 then
    evaluates and writes the results, and the other ranks return None.
    """
    started = time.perf_counter()
    config = protocol.config()
    check_run_can_start(config, run)
    data = protocol.data
    if data is not None and detect_source_kind(data) != "cifar10":
        raise ValueError(
            f"{data} is a {detect_source_kind(data)} source, not CIFAR-10: give the official "
            "archive, its extracted folder, or a folder/zip of <train|test>/<class>/<image>."
        )
    word_vectors = run.word_vectors
    if method_for(config).uses_word_vectors:
        word_vectors = word_vectors or _default_cifar10_word_vectors(data)
        if word_vectors is None:
            raise ValueError(
                "the semantic loss needs the CIFAR-10 word vectors (10 x 300); pass "
                "--word-vectors PATH (e.g. shared/data/wordvec/cifar10.txt), or pick an "
                "ablation without it (E, E+LC)."
            )
    begin = time.perf_counter()
    source = load_source(data if data is not None else _download_cifar10(), progress=run.progress)
    split = split_per_class(
        source.labels,
        protocol.train_per_class,
        protocol.query_per_class,
        seed=protocol.split_seed,
        classes=source.classes,
    )
    prepared = prepare_run(config, source, split, word_vectors=word_vectors)
    load_seconds = time.perf_counter() - begin
    say = run.say()
    say(
        f"CIFAR-10: {len(source)} images; split per class {protocol.train_per_class}/"
        f"{protocol.query_per_class} (seed {protocol.split_seed}): "
        f"{len(split.train)} train, {len(split.query)} query, {len(split.database)} database"
    )
    result = train_run(prepared, dataclasses.replace(run, log=say))
    if not result.is_main:  # under torchrun: rank 0 evaluates and writes the results
        return None
    say(f"encoding {len(split.database)} database images and searching {len(split.query)} queries")
    evaluation = evaluate_split(
        result.model,
        source,
        split,
        baselines=protocol.baselines,
        curves=True,
        progress=run.progress,
        workers=run.workers,
    )
    reproduced = ReproduceResult(
        evaluation=evaluation,
        train=result,
        ablation=protocol.ablation,
        split_seed=protocol.split_seed,
        protocol=_protocol_words(protocol, source, split, evaluation),
        wall_seconds={
            "load": round(load_seconds, 2),
            "train": round(result.wall_seconds, 2),
            **evaluation.seconds,
            "total": round(time.perf_counter() - started, 2),
        },
        command=protocol.command,
    )
    out = Path(run.out_dir)
    write_json_atomic(out / "results.json", reproduced.to_dict())
    write_text_atomic(out / "results.md", _results_markdown(reproduced))
    _write_cifar10_report(out / "report", reproduced)
    return reproduced


def _protocol_words(
    protocol: ReproduceSettings, source: Source, split: Split, evaluation: RetrievalEvaluation
) -> str:
    return (
        f"all {len(source):,} images; per class {protocol.train_per_class} train / "
        f"{protocol.query_per_class} query (seed {protocol.split_seed}); database = the other "
        f"{len(split.database):,}; mAP@{evaluation.r} with {evaluation.search} over the codes"
    )


def _default_cifar10_word_vectors(data: str | Path | None) -> Path | None:
    """``<data>/../../wordvec/cifar10.txt`` when it exists (the offline shared-data layout)."""
    if data is None:
        return None
    candidate = Path(data).resolve().parent.parent / "wordvec" / "cifar10.txt"
    return candidate if candidate.is_file() else None


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
            f"Method: {result.describe_codes()}.",
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
        f"{result.method} training": {"train_s": wall["train"], "epochs": float(result.epochs)},
        **details.timings(),
    }
    notes = (
        f"Command: `{result.command or 'dpq reproduce cifar10'}`\n\n"
        f"Protocol: {result.protocol}. One model (method {result.describe_codes()}; ablation "
        f"`{result.ablation}`, {result.epochs} epochs, {result.train.precision}). Query "
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
