"""``dpq reproduce cifar10``: the paper's CIFAR-10 protocol with one model of any method."""

from __future__ import annotations

import argparse
import shlex
import sys

from dpq.cli.options import add_command, add_workers_option, parse_methods
from dpq.cli.recipe import add_recipe_options, add_run_options, recipe_from_args, run_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "reproduce",
        help="the paper's CIFAR-10 protocol: mAP@54000 at 8-32 bits",
        description="Merge CIFAR-10's 60,000 images, draw 500 training and 100 query images "
        "per class (seed --split-seed), train one model on the 5,000, encode the other "
        "54,000, search them for the 1,000 queries and report mAP@54000 per code length. "
        "The model is DPQ's (the cifar10 recipe), or with --method NAME --bits B another "
        "method's on the same recipe. Writes results.json, results.md and report/ into --out.",
    )
    parser.add_argument("dataset", choices=["cifar10"], help="the benchmark")
    parser.add_argument(
        "--data", help="CIFAR-10 archive, folder or zip (default: download into the cache)"
    )
    parser.add_argument(
        "--split-seed", type=int, default=0, help="seed of the per-class protocol split"
    )
    parser.add_argument(
        "--baselines",
        default="",
        metavar="NAMES",
        help="comma-separated baselines (see `dpq evaluate`) run on the same features and shown "
        "beside DPQ in the report (default: none)",
    )
    add_workers_option(parser)
    add_recipe_options(parser)
    add_run_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dpq.evaluate.report import format_results_table
    from dpq.training.reproduce import ReproduceSettings, reproduce_cifar10

    argv = getattr(args, "argv", None) or sys.argv[1:]
    protocol = ReproduceSettings(
        data=args.data,
        ablation=args.ablation,
        base_config=recipe_from_args(args, default="cifar10"),
        baselines=parse_methods(args.baselines),
        split_seed=args.split_seed,
        command="dpq " + " ".join(shlex.quote(a) for a in argv),
    )
    result = reproduce_cifar10(protocol, run_settings(args))
    if result is None:  # a torchrun rank other than 0: rank 0 evaluates and reports
        return 0
    print(
        format_results_table(
            result.evaluation,
            title=f"CIFAR-10 ({result.ablation}, split seed {result.split_seed}), "
            f"{result.epochs} epochs, {result.train.precision}",
        )
    )
    wall = result.wall_seconds
    print(
        f"wall time: train {wall['train'] / 60:.1f} min, total {wall['total'] / 60:.1f} min; "
        f"results in {args.out}/results.json, report in {args.out}/report/report.md"
    )
    return 0
