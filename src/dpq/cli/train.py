"""``dpq train``: one model of any retrieval method from a labelled source or saved features."""

from __future__ import annotations

import argparse

from dpq.cli.options import SOURCE_HELP, add_command, add_source_options, source_spec
from dpq.cli.recipe import add_recipe_options, add_run_options, recipe_from_args, run_settings

SPLIT_NAMES = ("auto", "all", "per-class")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "train",
        help="train a model (DPQ or --method) on labelled data",
        description="Train one DPQ model (backbone, semantic head, classifier, L quantization "
        "levels), or with --method another retrieval method's at --bits bits. Checkpoints are written every epoch into --out/checkpoints (continue an "
        "interrupted run with --resume); the final model goes to --out/model "
        "(model.safetensors + config.json). The output folder is locked while a run trains "
        "into it.",
    )
    parser.add_argument("data", nargs="?", help=SOURCE_HELP)
    parser.add_argument(
        "--features", metavar="NPY", help="instead of a source: precomputed float features (N, F)"
    )
    parser.add_argument(
        "--labels", metavar="NPY", help="labels of --features: int (N,) class ids or multi-hot"
    )
    add_source_options(parser)
    split = parser.add_argument_group("which rows train")
    split.add_argument(
        "--split",
        default="auto",
        metavar="{auto,all,per-class,FILE}",
        help="train on everything (all), on a per-class draw (per-class, saved to "
        "--out/split.json), or on the training rows of a split file (`dpq data split`; the "
        "way for multi-label data); auto: per-class 500/100 for CIFAR-10, all otherwise",
    )
    split.add_argument(
        "--train-per-class", type=int, default=500, help="training items per class (per-class)"
    )
    split.add_argument(
        "--query-per-class", type=int, default=100, help="query items per class (per-class)"
    )
    split.add_argument("--split-seed", type=int, default=0, help="seed of the per-class split")
    add_recipe_options(parser)
    add_run_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from dpq.training.experiments import SplitSettings, train_from_source

    source = dataclasses.replace(source_spec(args, images=args.data), labels=args.labels)
    result = train_from_source(
        recipe_from_args(args),
        source,
        run_settings(args),
        SplitSettings(
            _split(args.split), args.train_per_class, args.query_per_class, args.split_seed
        ),
    )
    if not result.is_main:  # under torchrun, rank 0 reports
        return 0
    last = result.history[-1] if result.history else {}
    print(
        f"trained {result.epochs} epochs in {result.wall_seconds:.1f} s; final loss "
        f"{last.get('total', float('nan')):.4g}; model saved to {result.model_dir}"
    )
    return 0


def _split(value: str):  # -> str | Split
    """``--split``: a name of :data:`SPLIT_NAMES`, or a split file, read."""
    import os

    if value in SPLIT_NAMES:
        return value
    from dpq.data import Split

    if not os.path.isfile(value):
        raise ValueError(
            f"--split {value!r} is neither auto, all, per-class nor an existing split file."
        )
    return Split.load(value)
