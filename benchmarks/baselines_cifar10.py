"""Every baseline vs DPQ's own codes on the same CIFAR-10 features: one mAP@R table with the
wall time of each method, saved as JSON (and optionally a report folder with the 32-bit PR and
precision@R figures).

Features directory layout (``.npy``, never unpickled): ``query_features``, ``query_labels``,
``db_features``, ``db_labels``, and optionally ``train_features`` + ``train_labels`` (the
protocol's 5,000 training images; without them the baselines are fitted on the database).
With a trained model these are its semantic-head features; ``--index`` adds DPQ's own codes
(a ``dpq.index.DPQIndex`` of the database, items in ``db_labels`` order).

    python benchmarks/baselines_cifar10.py run FEATURES_DIR [--index index.npz] \\
        [--out results.json] [--report-dir report/]

For development without a model, ``make-pixel-features`` writes such a directory from CIFAR-10
pixels (standardised, randomly projected to 300-d) on the paper's split (500 train / 100
query per class, the other 54,000 the database):

    python benchmarks/baselines_cifar10.py make-pixel-features \\
        --cifar ../shared/data/cifar10/cifar10-jpeg.zip --out /tmp/cifar_pixels
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from dpq.atomic import write_json_atomic
from dpq.evaluate.baselines import BASELINES
from dpq.evaluate.feature_set import FEATURE_FILES, FeatureSet
from dpq.evaluate.report import (
    format_map_table,
    margin_summary,
    plot_pr_curves,
    plot_precision_at_r,
    timing_table,
    write_report,
)
from dpq.evaluate.results import Evaluation
from dpq.evaluate.retrieval import evaluate_methods
from dpq.evaluate.rows import baseline_methods, dpq_methods, float_method
from dpq.index import DPQIndex


def make_pixel_features(cifar: str, out: str, dim: int, seed: int, cache_dir: str | None) -> None:
    from dpq.data import load_cifar10, split_per_class

    dataset = load_cifar10(cifar, cache_dir=cache_dir)
    pixels = dataset.images.reshape(len(dataset.labels), -1).astype(np.float32) / 255.0
    pixels -= pixels.mean(axis=0)
    pixels /= pixels.std(axis=0) + 1e-6
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((pixels.shape[1], dim)).astype(np.float32) / np.sqrt(dim)
    features = pixels @ projection
    split = split_per_class(dataset.labels, 500, 100, seed=seed)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = {"train": split.train, "query": split.query, "db": split.database}
    for part, rows in parts.items():
        np.save(out_dir / FEATURE_FILES[f"{part}_features"], features[rows])
        np.save(out_dir / FEATURE_FILES[f"{part}_labels"], dataset.labels[rows])
    sizes = ", ".join(f"{part} {len(rows)}" for part, rows in parts.items())
    print(f"wrote {dim}-d pixel features to {out_dir} ({sizes})")


def summary_table(evaluation: Evaluation) -> str:
    """mAP per code length and total wall seconds (fit + encode + search, all lengths)."""
    map_table = evaluation.map_table()
    reference = evaluation.float_reference()
    if reference is not None:
        map_table = {**map_table, "float": {bits: reference for bits in _bits(map_table)}}
    lines = format_map_table(map_table).splitlines()
    totals: dict[str, float] = {}
    for result in evaluation.results:
        seconds = (result.fit_seconds or 0) + (result.encode_seconds or 0) + result.search_seconds
        totals[result.method] = totals.get(result.method, 0.0) + seconds
    width = max(len(line) for line in lines)
    out = [lines[0].ljust(width) + "  wall s"]
    for line, method in zip(lines[1:], map_table, strict=True):
        out.append(line.ljust(width) + f"  {totals.get(method, 0.0):6.1f}")
    return "\n".join(out)


def _bits(map_table: dict[str, dict[int, float]]) -> list[int]:
    return sorted({bits for row in map_table.values() for bits in row})


def run(args: argparse.Namespace) -> None:
    features = FeatureSet.from_directory(args.features_dir)
    bits = [int(b) for b in args.bits.split(",")]
    names = list(BASELINES) if args.baselines == "all" else args.baselines.split(",")
    options = {
        "opq": {"iterations": args.opq_iterations},
        "rq": {"beam_size": args.rq_beam_size},
        "lsq": {"train_iterations": args.lsq_train_iterations},
    }
    methods = []
    if args.index:
        index = DPQIndex.load(args.index)
        methods += dpq_methods(index, bits, len(features.db_labels), features.dim)
    methods += baseline_methods(names, bits, features, seed=args.seed, options=options)
    if not args.no_float:
        methods.append(float_method(features))
    began = time.perf_counter()
    evaluation = evaluate_methods(features, methods, r=args.r)
    wall = time.perf_counter() - began
    print(
        f"\nmAP@{evaluation.r}: {evaluation.n_queries} queries, {evaluation.n_database} database "
        f"items, D = {features.dim}; baselines fitted on the {evaluation.fitted_on} set"
    )
    for note in evaluation.notes:
        print(f"note: {note}")
    print(summary_table(evaluation))
    print(f"\ntimes per method and code length ({wall:.0f} s in all):")
    print(timing_table(evaluation.timings(), markdown=False))
    if "dpq" in evaluation.map_table():
        print("\n" + margin_summary(evaluation.map_table(), "dpq"))
    out = Path(args.out or Path(args.features_dir) / "baselines_results.json")
    print(f"\nwrote {write_json_atomic(out, evaluation.to_dict())}")
    if args.report_dir:
        report_dir = Path(args.report_dir)
        pr, at_r = evaluation.curves(32)
        figures = {}
        if pr:
            figures["Precision-recall, 32 bits"] = plot_pr_curves(
                pr, report_dir / "pr_32bits.png", "Precision-recall, 32 bits"
            )
        if at_r:
            figures["Precision@R, 32 bits"] = plot_precision_at_r(
                at_r, report_dir / "precision_at_r_32bits.png", "Precision@R, 32 bits"
            )
        notes = "\n".join(
            [
                f"Features: `{args.features_dir}` (D = {features.dim}).",
                f"mAP@{evaluation.r}, DVSQ/DPQ convention, ties broken by database index.",
                *evaluation.notes,
            ]
        )
        report = write_report(
            report_dir,
            title="Baselines on CIFAR-10 features",
            map_table=evaluation.map_table(),
            timings=evaluation.timings(),
            figures=figures,
            notes=notes,
            extra={"evaluation": evaluation.to_dict()},
        )
        print(f"wrote {report}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    runner = sub.add_parser("run", help="evaluate every baseline (and DPQ) on a features directory")
    runner.add_argument("features_dir", help="directory of query/db/(train) features + labels .npy")
    runner.add_argument("--index", help="DPQ index of the database (adds the dpq row)")
    runner.add_argument(
        "--baselines", default="all", help=f"'all' or a comma list of {', '.join(BASELINES)}"
    )
    runner.add_argument("--bits", default="8,16,24,32", help="code lengths (default 8,16,24,32)")
    runner.add_argument(
        "--r", type=int, default=None, help="mAP@R cutoff (default: whole database)"
    )
    runner.add_argument("--seed", type=int, default=0, help="seed of every baseline")
    runner.add_argument(
        "--opq-iterations", type=int, default=50, help="OPQ rotation iterations (faiss: 50)"
    )
    runner.add_argument("--rq-beam-size", type=int, default=5, help="RQ encoding beam (faiss: 5)")
    runner.add_argument(
        "--lsq-train-iterations", type=int, default=25, help="LSQ training iterations (faiss: 25)"
    )
    runner.add_argument(
        "--no-float", action="store_true", help="skip the unquantized reference row"
    )
    runner.add_argument("--out", help="JSON results (default FEATURES_DIR/baselines_results.json)")
    runner.add_argument(
        "--report-dir", help="also write report.md + 32-bit PR / precision@R PNGs here"
    )
    runner.set_defaults(func=run)

    maker = sub.add_parser("make-pixel-features", help="development features from CIFAR-10 pixels")
    maker.add_argument("--cifar", required=True, help="CIFAR-10 archive, folder or zip")
    maker.add_argument("--out", required=True, help="features directory to write")
    maker.add_argument("--dim", type=int, default=300, help="projected dimension (default 300)")
    maker.add_argument("--seed", type=int, default=0, help="seed of the split and the projection")
    maker.add_argument("--cache-dir", help="decoded CIFAR-10 cache (default $DPQ_CACHE_DIR)")
    maker.set_defaults(
        func=lambda a: make_pixel_features(a.cifar, a.out, a.dim, a.seed, a.cache_dir)
    )
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
