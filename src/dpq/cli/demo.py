"""``dpq demo``: the digits end to end in about a minute."""

from __future__ import annotations

import argparse

from dpq.cli.options import add_command, add_quiet_option, log_for


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "demo",
        help="digits end to end in a minute: train, encode, search, mAP",
        description="Split sklearn's 8x8 digits per class, train a small CNN with DPQ, encode "
        "the rest as the database, search it with AQD and print mAP@(database size) at "
        "8/16/24/32 bits.",
    )
    parser.add_argument("--epochs", type=int, default=15, help="training epochs")
    parser.add_argument("--train-per-class", type=int, default=50, help="training digits per class")
    parser.add_argument("--query-per-class", type=int, default=10, help="query digits per class")
    parser.add_argument("--num-levels", type=int, default=4, metavar="L", help="levels")
    parser.add_argument(
        "--codebook-size", type=int, default=256, metavar="K", help="codewords per level"
    )
    parser.add_argument("--dim", type=int, default=64, metavar="D", help="feature size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the training")
    parser.add_argument("--out", help="keep the run here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    add_quiet_option(parser, "progress or log lines")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from dpq.evaluate.report import format_results_table
    from dpq.training.experiments import run_demo

    result = run_demo(
        out_dir=args.out,
        epochs=args.epochs,
        train_per_class=args.train_per_class,
        query_per_class=args.query_per_class,
        num_levels=args.num_levels,
        codebook_size=args.codebook_size,
        dim=args.dim,
        seed=args.seed,
        progress=not args.quiet,
        log=log_for(args),
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    split, settings = result.split, result.settings
    print(
        f"dpq demo: {result.dataset}; {split['train']} train / {split['query']} query / "
        f"{split['database']} database images (seed {split['seed']})"
    )
    print(
        f"{settings['backbone']}, L={settings['num_levels']} K={settings['codebook_size']} "
        f"D={settings['dim']}, {settings['epochs']} epochs, trained in "
        f"{result.wall_seconds['train']:.1f} s"
    )
    print(format_results_table(result.evaluation))
    print(f"total wall time {result.wall_seconds['total']:.1f} s")
    return 0
