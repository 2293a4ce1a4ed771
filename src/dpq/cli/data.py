"""``dpq data info`` and ``dpq data split``: what a source holds, and a protocol split of it."""

from __future__ import annotations

import argparse

from dpq.cli.options import (
    SOURCE_HELP,
    add_command,
    add_quiet_option,
    add_source_options,
    hidden_alias,
    read_source,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    data = add_command(
        subparsers,
        "data",
        help="inspect a dataset; draw a protocol split",
        description="Inspect a labelled source (`dpq data info`) and draw the training / "
        "query / database split of a benchmark protocol (`dpq data split`).",
    )
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    info = add_command(
        commands,
        "info",
        help="counts per class, image size, protocol split sizes",
        description="Summarise a data source: its kind, images per class, image size and, "
        "for a benchmark, the sizes of its protocol split.",
    )
    info.add_argument("source", help=SOURCE_HELP + "; the kind is detected")
    add_source_options(info, cache=True, workers=False)
    hidden_alias(info, "--root", "--image-root")  # the flag's name before --image-root
    info.add_argument(
        "--split-seed", type=int, default=0, help="seed of the protocol split whose sizes are shown"
    )
    hidden_alias(info, "--seed", "--split-seed", type=int)  # the name before --split-seed
    add_quiet_option(info)

    split = add_command(
        commands,
        "split",
        help="draw a protocol split (train/query/database rows) to a file",
        description="Draw --train-per-class training and --query-per-class query items per "
        "class; the database is every other item (the CIFAR-10 protocol of the DPQ paper with "
        "the defaults 500/100). Indices follow the loader's order (CIFAR-10: train then test, "
        "classes in CIFAR order).",
    )
    split.add_argument("source", help="any source that `dpq data info` accepts")
    split.add_argument(
        "--out", required=True, help="where to write the split: a .json or .npz file"
    )
    split.add_argument(
        "--protocol",
        choices=["per-class", "nus-wide"],
        default="per-class",
        help="per-class (CIFAR-10: --train-per-class and --query-per-class per class, the "
        "database the rest) or nus-wide (multi-label: --query-per-class random queries in "
        "all, the database the rest, --train-per-class training items in all drawn from the "
        "database)",
    )
    split.add_argument(
        "--train-per-class",
        type=int,
        default=500,
        help="training items per class (nus-wide: in all)",
    )
    split.add_argument(
        "--query-per-class", type=int, default=100, help="query items per class (nus-wide: in all)"
    )
    split.add_argument(
        "--split-seed", type=int, default=0, help="random seed (same seed, same split)"
    )
    # the names before they were those of `dpq train`, kept for one release
    hidden_alias(split, "--n-train", "--train-per-class", type=int)
    hidden_alias(split, "--n-query", "--query-per-class", type=int)
    hidden_alias(split, "--seed", "--split-seed", type=int)
    split.add_argument(
        "--train-in-database",
        action="store_true",
        help="keep the training items in the database (the paper leaves them out)",
    )
    add_source_options(split, cache=True, workers=False)
    add_quiet_option(split)
    data.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return {"info": _info, "split": _split}[args.data_command](args)


def _info(args: argparse.Namespace) -> int:
    from dpq.data.info import describe_source

    info = describe_source(
        args.source,
        skip_corrupt=args.skip_corrupt,
        image_size=args.image_size,
        root=args.image_root,
        strip_prefix=args.strip_prefix,
        cache_dir=args.cache_dir,
        seed=args.split_seed,
        progress=not args.quiet,
    )
    print(info.format())
    return 0


def _split(args: argparse.Namespace) -> int:
    from dpq.atomic import check_writable_file
    from dpq.data.splits import split_source

    check_writable_file(args.out, "--out")
    split = split_source(
        read_source(args, args.source, labels_only=True),
        args.protocol,
        args.train_per_class,
        args.query_per_class,
        seed=args.split_seed,
        train_in_database=args.train_in_database,
    )
    split.save(args.out)
    sizes = split.sizes
    print(
        f"train {sizes['train']:,} / query {sizes['query']:,} / database {sizes['database']:,} "
        f"(seed {args.split_seed}) written to {args.out}"
    )
    return 0
