"""``dpq train``: one DPQ model from a labelled source or saved features."""

from __future__ import annotations

import argparse

from dpq.cli.options import SOURCE_HELP, add_command, add_source_options, log_for
from dpq.cli.recipe import add_recipe_options, add_run_options, recipe_from_args

SPLIT_NAMES = ("auto", "all", "per-class")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "train",
        help="train a DPQ model on a labelled collection",
        description="Train one DPQ model (backbone, semantic head, classifier, L quantization "
        "levels). Checkpoints are written every epoch into --out/checkpoints (continue an "
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
    from dpq.training.experiments import train_from_source

    result = train_from_source(
        recipe_from_args(args),
        args.out,
        source=args.data,
        features=args.features,
        labels=args.labels,
        image_root=args.image_root,
        image_size=args.image_size,
        skip_corrupt=args.skip_corrupt,
        split=_split(args.split),
        train_per_class=args.train_per_class,
        query_per_class=args.query_per_class,
        split_seed=args.split_seed,
        word_vectors=args.word_vectors,
        resume=args.resume,
        progress=not args.quiet,
        log=log_for(args),
        device=args.device,
        workers=args.workers,
        in_memory=_loading(args),
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


def _loading(args: argparse.Namespace):  # -> bool | str
    from dpq.data.sources import loading_mode

    return loading_mode(args.loading)
