"""Train-and-evaluate flows behind ``dpq train``, ``dpq demo`` and ``dpq reproduce``.

- :func:`evaluate_retrieval`: encode a database with a trained model, AQD search at every code
  length, mAP@R (through :func:`dpq.baselines.evaluation.evaluate_methods`).
- :func:`train_from_source`: load a collection, split it, complete the config, train.
- :func:`run_demo`: the digits end to end in about a minute.
- :func:`reproduce_cifar10`: the paper's CIFAR-10 protocol with one model, results + report.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpq.config import DPQConfig
from dpq.model import DPQModel, write_atomic
from dpq.train import ArrayDataset, TrainResult, load_training_source, train_model


@dataclass
class RetrievalEvaluation:
    """mAP@R of one model's codes at every prefix length, with timings.

    Attributes:
        map_by_bits: code length in bits (l * log2 K) -> mAP@R of AQD search over the codes
            (inner-product search for class-posterior features).
        r: R, the number of ranked database items scored.
        float_map: mAP@R of exact search (Euclidean, or inner product for class-posterior
            features) over the float features (a ceiling for the codes), or None when not
            computed.
        query_accuracy: classifier accuracy on the queries (single-label only).
        database_accuracy: classifier accuracy on the database (single-label only).
        class_probability_map: mAP@R of ranking the database by the L2 distance between
            softmax class probabilities (single-label only): what a fully class-collapsed
            embedding of this classifier would reach, a diagnostic of how tightly the
            features gather by class, not a code.
        seconds: wall time of "features" (network), "encode" (codes), "search" (all code
            lengths, scoring included).
        num_queries: number of queries.
        num_database: database size.
        details: the :class:`dpq.baselines.evaluation.Evaluation` behind the numbers
            (per-method timings, curves, baselines when asked for).
    """

    map_by_bits: dict[int, float]
    r: int
    float_map: float | None
    query_accuracy: float | None
    seconds: dict[str, float]
    num_queries: int
    num_database: int
    details: Any = None
    database_accuracy: float | None = None
    class_probability_map: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (bit counts become string keys)."""
        out = {
            "map": {str(bits): value for bits, value in self.map_by_bits.items()},
            "r": self.r,
            "float_map": self.float_map,
            "query_accuracy": self.query_accuracy,
            "database_accuracy": self.database_accuracy,
            "class_probability_map": self.class_probability_map,
            "seconds": self.seconds,
            "num_queries": self.num_queries,
            "num_database": self.num_database,
        }
        if self.details is not None:
            out["details"] = self.details.to_dict()
        return out


def evaluate_retrieval(
    model: DPQModel,
    query_inputs: np.ndarray,
    query_labels: np.ndarray,
    database_inputs: np.ndarray,
    database_labels: np.ndarray,
    r: int | None = None,
    float_baseline: bool = True,
    baselines: tuple[str, ...] = (),
    train_inputs: np.ndarray | None = None,
    train_labels: np.ndarray | None = None,
    curves: bool = False,
    progress: bool = True,
) -> RetrievalEvaluation:
    """Encode the database with the model into a :class:`dpq.index.DPQIndex`, search it with
    AQD for every query at every code length and score mAP@R, with
    :func:`dpq.baselines.evaluation.evaluate_methods` (optionally beside baselines fitted on
    the same features).

    Args:
        model: a trained model.
        query_inputs, database_inputs: uint8 (N, H, W, 3) images or float (N, F) features.
        query_labels, database_labels: int64 (N,) or multi-hot (N, C).
        r: R of mAP@R (default: the whole database).
        float_baseline: also score exact L2 search over the float features.
        baselines: names of :data:`dpq.baselines.BASELINES` to run on the same features.
        train_inputs, train_labels: the training set, for fitting the baselines.
        curves: compute PR and precision@R curves at the longest code.
        progress: tqdm bars.
    """
    from dpq.baselines.evaluation import FeatureSet, evaluate_methods
    from dpq.index import DPQIndex

    seconds: dict[str, float] = {}
    begin = time.perf_counter()
    query_features, query_logits = model.extract_features_and_logits(query_inputs)
    database_features, database_logits = model.extract_features_and_logits(
        database_inputs, progress=progress
    )
    train_features = None
    if baselines and train_inputs is not None:
        train_features = model.extract_features(train_inputs, progress=progress)
    seconds["features"] = time.perf_counter() - begin

    begin = time.perf_counter()
    search_mode = model.config.model.search_mode
    index = DPQIndex(
        model.codebooks(), assignment=model.config.quantizer.assignment, search_mode=search_mode
    )
    index.add(model.encode_features(database_features))
    seconds["encode"] = time.perf_counter() - begin

    bits_per_level = model.config.quantizer.bits_per_level
    bits = [level * bits_per_level for level in range(1, model.config.quantizer.num_levels + 1)]
    features = FeatureSet(
        query_features=query_features,
        query_labels=np.asarray(query_labels),
        db_labels=np.asarray(database_labels),
        db_features=database_features,
        train_features=train_features,
        train_labels=None if train_features is None else np.asarray(train_labels),
        metric="ip" if search_mode == "ip" else "l2",
    )
    methods = ["dpq", *baselines] + (["float"] if float_baseline else [])
    begin = time.perf_counter()
    details = evaluate_methods(
        features,
        methods,
        bits=bits,
        r=r,
        dpq_index=index,
        curve_bits=(bits[-1],) if curves else (),
        progress=progress,
    )
    seconds["search"] = time.perf_counter() - begin
    accuracy = database_accuracy = probability_map = None
    if np.asarray(query_labels).ndim == 1:
        accuracy = float((query_logits.argmax(1) == np.asarray(query_labels)).mean())
        database_accuracy = float((database_logits.argmax(1) == np.asarray(database_labels)).mean())
        probability_map = class_probability_map(
            query_logits, database_logits, query_labels, database_labels, details.r
        )
    return RetrievalEvaluation(
        map_by_bits=dict(details.map_table()["dpq"]),
        r=details.r,
        float_map=details.float_reference(),
        query_accuracy=accuracy,
        seconds={k: round(v, 2) for k, v in seconds.items()},
        num_queries=len(query_labels),
        num_database=len(database_labels),
        details=details,
        database_accuracy=database_accuracy,
        class_probability_map=probability_map,
    )


def class_probability_map(
    query_logits: np.ndarray,
    database_logits: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    r: int,
    chunk: int = 64,
) -> float:
    """mAP@R of ranking the database by the L2 distance between softmax probabilities.

    The ranking a fully class-collapsed embedding of the same classifier would give (items
    of the query's predicted class first, the most confident first): a diagnostic that
    separates what the classifier's accuracy allows from how tightly the features gather.

    Args:
        query_logits, database_logits: float (nq, C) and (N, C) classifier logits.
        query_labels, database_labels: int64 (nq,) and (N,) class ids.
        r: R of mAP@R (<= N).
        chunk: queries ranked at a time (memory: chunk x N distances).
    """
    from dpq.metrics import average_precision_at_r, rank_by_distance

    def probabilities(logits: np.ndarray) -> np.ndarray:
        shifted = np.asarray(logits, np.float64)
        shifted = np.exp(shifted - shifted.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    query_p, database_p = probabilities(query_logits), probabilities(database_logits)
    database_sq = (database_p**2).sum(axis=1)
    precisions = []
    for start in range(0, len(query_p), chunk):
        block = query_p[start : start + chunk]
        distances = (block**2).sum(axis=1)[:, None] - 2.0 * block @ database_p.T + database_sq
        ranked = rank_by_distance(distances, k=r)
        precisions.append(
            average_precision_at_r(
                ranked, np.asarray(query_labels)[start : start + chunk], database_labels, r
            )
        )
    return float(np.concatenate(precisions).mean())


def format_results_table(evaluation: RetrievalEvaluation, title: str = "") -> str:
    """A plain-text table: one row per code length, then the float-feature ceiling."""
    lines = [title] if title else []
    lines.append(f"{'code':>10}  mAP@{evaluation.r}")
    for bits, value in evaluation.map_by_bits.items():
        lines.append(f"{bits:>6} bit  {value:.4f}")
    if evaluation.float_map is not None:
        lines.append(f"{'float':>10}  {evaluation.float_map:.4f}  (exact search, float features)")
    if evaluation.query_accuracy is not None:
        lines.append(f"query accuracy {evaluation.query_accuracy:.4f}")
    if evaluation.database_accuracy is not None:
        lines.append(f"database accuracy {evaluation.database_accuracy:.4f}")
    if evaluation.class_probability_map is not None:
        lines.append(
            f"class-probability ranking mAP {evaluation.class_probability_map:.4f} "
            "(diagnostic: a fully class-collapsed embedding of this classifier)"
        )
    return "\n".join(lines)


def orthogonal_label_embeddings(num_classes: int, dim: int, seed: int = 0) -> np.ndarray:
    """Seeded random orthonormal class vectors, float32 (C, D), for data without word vectors.

    With them the adaptive margin is 1 for every pair of classes: L_S becomes a plain
    cosine-margin loss towards one fixed direction per class.
    """
    if dim < num_classes:
        raise ValueError(
            f"orthogonal label embeddings need dim >= num_classes; got dim {dim} for "
            f"{num_classes} classes."
        )
    gaussian = np.random.default_rng(seed).normal(size=(dim, num_classes))
    q, _ = np.linalg.qr(gaussian)
    return np.ascontiguousarray(q.T, dtype=np.float32)


def complete_config(config: DPQConfig, inputs: np.ndarray, labels: np.ndarray) -> DPQConfig:
    """Fill the data-dependent fields of ``config`` from the training data.

    Sets ``model.num_classes`` and ``model.multilabel`` from the labels; for images, the
    per-channel mean/std when the config still has the generic defaults; for features
    (float (N, F)), the identity backbone with ``in_features = F``.
    """
    from dpq.config import ModelConfig
    from dpq.model import image_statistics

    labels = np.asarray(labels)
    multilabel = labels.ndim == 2
    num_classes = int(labels.shape[1]) if multilabel else int(labels.max()) + 1
    updates: dict[str, Any] = {"num_classes": num_classes, "multilabel": multilabel}
    defaults = ModelConfig()
    if isinstance(inputs, np.ndarray) and inputs.ndim == 2:
        updates["backbone"] = "identity"
        updates["backbone_kwargs"] = {"in_features": int(inputs.shape[1])}
    elif (
        config.model.image_mean == defaults.image_mean
        and config.model.image_std == defaults.image_std
    ):
        mean, std = image_statistics(np.asarray(inputs))
        updates["image_mean"], updates["image_std"] = mean, std
    return config.replace(model=updates)


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


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
) -> dict[str, Any]:
    """Digits end to end: split per class, train a small CNN with DPQ, encode the rest as the
    database, search it with AQD, score mAP@(database size) at every code length.

    The digits have no word vectors: the semantic loss uses seeded orthonormal class vectors
    (:func:`orthogonal_label_embeddings`).

    Returns:
        JSON-ready results: sizes, settings, the evaluation and wall times.
    """
    import tempfile

    from dpq.config import LossConfig, ModelConfig, QuantizerConfig, TrainConfig
    from dpq.data import load_digits, split_per_class

    started = time.perf_counter()
    dataset = load_digits()
    split = split_per_class(dataset.labels, train_per_class, query_per_class, seed)
    train_images = dataset.images[split.train]
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
    config = complete_config(config, train_images, dataset.labels[split.train])
    word_vectors = orthogonal_label_embeddings(config.model.num_classes, dim, seed)
    with tempfile.TemporaryDirectory(prefix="dpq-demo-") as scratch:
        target = Path(out_dir) if out_dir is not None else Path(scratch)
        result = train_model(
            config,
            ArrayDataset(train_images, dataset.labels[split.train]),
            word_vectors,
            target,
            progress=progress,
            log=log,
        )
        evaluation = evaluate_retrieval(
            result.model,
            dataset.images[split.query],
            dataset.labels[split.query],
            dataset.images[split.database],
            dataset.labels[split.database],
            progress=False,
        )
    return {
        "dataset": "sklearn digits (8x8)",
        "split": {**split.sizes, "seed": seed},
        "settings": {
            "backbone": "small_cnn",
            "num_levels": num_levels,
            "codebook_size": codebook_size,
            "dim": dim,
            "epochs": result.epochs,
        },
        "evaluation": evaluation.to_dict(),
        "evaluation_table": format_results_table(evaluation),
        "wall_seconds": {
            "train": round(result.wall_seconds, 2),
            "total": round(time.perf_counter() - started, 2),
        },
    }


def train_from_source(
    config: DPQConfig,
    out_dir: str | Path,
    source: str | Path | None = None,
    features: str | Path | None = None,
    labels: str | Path | None = None,
    image_root: str | Path | None = None,
    image_size: int | None = None,
    split: str = "auto",
    train_per_class: int = 500,
    query_per_class: int = 100,
    split_seed: int = 0,
    word_vectors: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Load a source, split it, complete the config from the data and train (``dpq train``).

    Args:
        config: the recipe (data-dependent fields are filled by :func:`complete_config`).
        split: "all" (train on everything), "per-class" (``train_per_class`` /
            ``query_per_class`` per class, seed ``split_seed``; the split is saved to
            ``out_dir/split.json``) or "auto" (per-class 500/100 for CIFAR-10, else all).
        word_vectors: a word-vector file (one row per class), "orthogonal" for seeded
            orthonormal class vectors, or None (only valid without the semantic loss).
        Other arguments as in :func:`load_training_source` and :meth:`Trainer.train`.
    """
    from dpq.data import load_word_vectors, split_per_class

    if split not in ("auto", "all", "per-class"):
        raise ValueError(f"split must be 'auto', 'all' or 'per-class'; got {split!r}.")
    inputs, all_labels, classes, kind = load_training_source(
        source, features, labels, image_root, image_size
    )
    if split == "per-class" or (split == "auto" and kind == "cifar10"):
        if all_labels.ndim != 1:
            raise ValueError("a per-class split needs single-label data; use split 'all'.")
        chosen = split_per_class(
            all_labels, train_per_class, query_per_class, split_seed, classes=classes
        )
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        chosen.save(Path(out_dir) / "split.json")
        train_index = chosen.train
    else:
        train_index = np.arange(len(all_labels))
    train_inputs, train_labels = inputs[train_index], all_labels[train_index]
    config = complete_config(config, train_inputs, all_labels)
    wv = None
    if config.loss.use_semantic:
        if word_vectors is None:
            raise ValueError(
                "the semantic loss needs one word vector per class: pass --word-vectors PATH, "
                "or --word-vectors orthogonal (seeded orthonormal class vectors), or switch "
                "the semantic loss off (--ablation E+LC)."
            )
        if str(word_vectors) == "orthogonal":
            wv = orthogonal_label_embeddings(
                config.model.num_classes, config.quantizer.dim, config.train.seed
            )
        else:
            wv = load_word_vectors(
                word_vectors, num_classes=config.model.num_classes, dim=config.quantizer.dim
            )
    return train_model(
        config,
        ArrayDataset(train_inputs, train_labels),
        wv,
        out_dir,
        resume=resume,
        progress=progress,
        log=log,
    )


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
) -> dict[str, Any]:
    """The CIFAR-10 protocol of the paper with one model: merge the 60,000 images, draw 500
    training and 100 query images per class (seed 0), train on the 5,000, encode the other
    54,000 as the database, search it with AQD for all 1,000 queries and report mAP@54000 at
    every code length (8/16/24/32 bits for L = 4, K = 256).

    Writes ``results.json`` and ``results.md`` (and the run: checkpoints, model, log, split)
    into ``out_dir``.

    Args:
        out_dir: output directory.
        data: CIFAR-10 source for :func:`dpq.data.load_cifar10` (None: download / cache).
        ablation: a name from :data:`dpq.config.ABLATIONS`.
        base_config: the recipe (default :func:`dpq.config.cifar10_recipe`); the ablation
            modifies it.
        minutes: training time budget (overrides the recipe's epochs).
        epochs: fixed number of epochs (overrides the recipe).
        word_vectors: the CIFAR-10 word-vector file (default: found beside the data).
        resume: continue an interrupted run in ``out_dir``.
        command: the command line, recorded in the results.
        baselines: names of :data:`dpq.baselines.BASELINES` evaluated on the same features
            (fitted on the training features) beside DPQ in the report.
        train_per_class, query_per_class: the protocol's 500 and 100; smaller values make a
            quick smoke run, not the benchmark.

    Also writes ``out_dir/report/`` (report.md, results.json, PR and precision@R figures).
    """
    from dpq.config import ablation_config, cifar10_recipe
    from dpq.data import load_cifar10, load_word_vectors, split_per_class

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

    wv = None
    if config.loss.use_semantic:
        path = Path(word_vectors) if word_vectors else _default_cifar10_word_vectors(data)
        if path is None:
            raise ValueError(
                "the semantic loss needs the CIFAR-10 word vectors (10 x 300); pass "
                "--word-vectors PATH (e.g. shared/data/wordvec/cifar10.txt), or pick an "
                "ablation without it (E, E+LC)."
            )
        wv = load_word_vectors(path, num_classes=10, dim=config.quantizer.dim)

    begin = time.perf_counter()
    dataset = load_cifar10(data)
    split = split_per_class(dataset.labels, train_per_class, query_per_class, seed=0)
    images = np.asarray(dataset.images)
    load_seconds = time.perf_counter() - begin
    say(
        f"CIFAR-10: {len(dataset)} images; split per class {train_per_class}/"
        f"{query_per_class} (seed 0): "
        f"{len(split.train)} train, {len(split.query)} query, {len(split.database)} database"
    )
    out.mkdir(parents=True, exist_ok=True)
    split.save(out / "split.json")
    config = complete_config(config, images[split.train], dataset.labels[split.train])
    train_data = ArrayDataset(images[split.train], dataset.labels[split.train])
    result = train_model(config, train_data, wv, out, resume=resume, progress=progress, log=say)
    say(f"encoding {len(split.database)} database images and searching {len(split.query)} queries")
    evaluation = evaluate_retrieval(
        result.model,
        images[split.query],
        dataset.labels[split.query],
        images[split.database],
        dataset.labels[split.database],
        baselines=tuple(baselines),
        train_inputs=images[split.train],
        train_labels=dataset.labels[split.train],
        curves=True,
        progress=progress,
    )
    total = time.perf_counter() - started
    results = {
        "dataset": "cifar10",
        "protocol": f"all {len(dataset):,} images; per class {train_per_class} train / "
        f"{query_per_class} query (seed 0); database = the other {len(split.database):,}; "
        f"mAP@{evaluation.r} with "
        + ("AQD" if config.model.search_mode == "aqd" else "inner-product search over the codes"),
        "ablation": ablation,
        "command": command,
        "config": result.model.config.to_dict(),
        "epochs": result.epochs,
        "plan": result.planned,
        "time_budget_minutes": config.train.time_budget_minutes,
        "evaluation": evaluation.to_dict(),
        "wall_seconds": {
            "load": round(load_seconds, 2),
            "train": round(result.wall_seconds, 2),
            **evaluation.seconds,
            "total": round(total, 2),
        },
        "model_dir": str(result.model_dir),
        "resumed_from_epoch": result.resumed_from_epoch,
    }
    _write_json_atomic(out / "results.json", results)
    write_atomic(out / "results.md", _results_markdown(results, evaluation).encode())
    _write_cifar10_report(out / "report", results, evaluation)
    return results


PAPER_CIFAR10_DPQ = {8: 0.814, 16: 0.833, 24: 0.834, 32: 0.831}
"""The paper's DPQ row on CIFAR-10 (mAP@54000; ImageNet-pretrained AlexNet on a GPU)."""


def _write_cifar10_report(
    folder: Path, results: dict[str, Any], evaluation: RetrievalEvaluation
) -> None:
    """report.md + results.json + PR / precision@R figures via :func:`dpq.report.write_report`."""
    from dpq import report

    details = evaluation.details
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
    wall = results["wall_seconds"]
    timings = {
        "dpq training": {"train_s": wall["train"], "epochs": float(results["epochs"])},
        **details.timings(),
    }
    notes = (
        f"Command: `{results.get('command') or 'dpq reproduce cifar10'}`\n\n"
        f"Protocol: {results['protocol']}. One model (ablation `{results['ablation']}`, "
        f"{results['epochs']} epochs) gives every code length. Query accuracy "
        f"{evaluation.query_accuracy} (database {evaluation.database_accuracy}); exact "
        f"search on the float features: mAP {evaluation.float_map}; database ranked by the "
        f"classifier's softmax probabilities (a fully class-collapsed reference): mAP "
        f"{evaluation.class_probability_map}. Wall time: {wall['total'] / 60:.1f} min in all."
    )
    report.write_report(
        folder,
        title=f"CIFAR-10, DPQ protocol (mAP@{evaluation.r})",
        map_table=map_table,
        timings=timings,
        figures=figures,
        notes=notes,
        extra={"run": results},
    )


def _results_markdown(results: dict[str, Any], evaluation: RetrievalEvaluation) -> str:
    bits = list(evaluation.map_by_bits)

    def number(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    header = "| ablation | epochs | train min | total min | " + " | ".join(
        f"{b} bits" for b in bits
    )
    header += " | float | query acc | db acc | class-prob mAP |"
    sep = "|" + "---|" * (8 + len(bits))
    wall = results["wall_seconds"]
    row = (
        f"| {results['ablation']} | {results['epochs']} | {wall['train'] / 60:.1f} | "
        f"{wall['total'] / 60:.1f} | "
        + " | ".join(f"{evaluation.map_by_bits[b]:.4f}" for b in bits)
        + " | "
        + " | ".join(
            number(value)
            for value in (
                evaluation.float_map,
                evaluation.query_accuracy,
                evaluation.database_accuracy,
                evaluation.class_probability_map,
            )
        )
        + " |"
    )
    lines = [
        f"# CIFAR-10 mAP@{evaluation.r} (DPQ protocol, one model)",
        "",
        f"Command: `{results.get('command') or 'dpq reproduce cifar10'}`",
        "",
        header,
        sep,
        row,
        "",
    ]
    return "\n".join(lines)
