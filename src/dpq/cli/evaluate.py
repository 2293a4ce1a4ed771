"""``dpq evaluate``: mAP@R of a retrieval method (DPQ or another) and baselines, on saved
features with an index file, or a trained model of any method."""

from __future__ import annotations

import argparse
import sys

from dpq.cli.options import (
    METHODS_PLACEHOLDER,
    add_command,
    add_device_options,
    add_quiet_option,
    add_source_options,
    check_out,
    image_flags_given,
    missing_flags,
    parse_bits,
    parse_methods,
    source_options,
)

DEFAULT_BITS = "8,16,24,32"
FEATURE_FLAGS = (
    "query_features",
    "query_labels",
    "db_features",
    "db_labels",
    "train_features",
    "train_labels",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "evaluate",
        help="mAP@R per code length of DPQ and baselines",
        description="Score retrieval methods on the same query/database features: mAP@R "
        "(DVSQ/DPQ convention; ties broken by database index) at each code length, printed as "
        "one table (methods x bits) and saved as JSON with timings and, at 32 bits, PR and "
        "precision@R curves. Two inputs: saved features (--query-features, --query-labels, "
        "--db-labels, ...; .npy files, never unpickled; labels are int (N,) class ids or "
        "multi-hot (N, C)), or a trained model with a labelled source and a split (--model, "
        "--images, --split): its features, its codes, the float features and any --baselines "
        "fitted on its training features.",
    )
    saved = parser.add_argument_group("saved features")
    saved.add_argument("--query-features", help="float (nq, D) .npy query features")
    saved.add_argument("--query-labels", help="query labels .npy, int (nq,) or multi-hot (nq, C)")
    saved.add_argument(
        "--db-features",
        help="float (N, D) .npy database features (needed by baselines; optional for the rows "
        "of --index)",
    )
    saved.add_argument("--db-labels", help="database labels .npy, int (N,) or multi-hot (N, C)")
    saved.add_argument(
        "--train-features",
        help="float .npy features the baselines are fitted on (default: the database features)",
    )
    saved.add_argument("--train-labels", help="labels of --train-features (used by itq-cca)")
    saved.add_argument(
        "--method",
        help=f"one method: a retrieval method ({METHODS_PLACEHOLDER}; the rows of --index "
        "under that name), a baseline name (pq, opq, rq, lsq, itq, itq-cca, lsh) or float "
        "(exhaustive search on the unquantized features)",
    )
    saved.add_argument(
        "--index",
        help="index file of the database (`dpq encode`: a DPQ index, searched at each prefix "
        "in --bits, or a binary index, searched by the signs of the query features at its "
        "one length), items in --db-labels order",
    )
    saved.add_argument(
        "--metric",
        choices=["l2", "ip"],
        help="how float features and the quantization baselines rank: l2 (squared "
        "Euclidean) or ip (inner product, for class-posterior features); default: ip when "
        "--index is searched by inner product, else l2",
    )
    saved.add_argument("--bits", default=DEFAULT_BITS, help="code lengths, comma-separated")
    saved.add_argument(
        "--float-reference",
        action="store_true",
        help="also score exhaustive search on the unquantized features (a reference row)",
    )
    saved.add_argument("--seed", type=int, default=0, help="seed of every baseline")
    parser.add_argument(
        "--baselines",
        help="baselines run in the same pass: 'all' or a comma list such as pq,opq,itq",
    )
    parser.add_argument(
        "--r", type=int, default=None, help="mAP@R cutoff (default: the whole database)"
    )
    parser.add_argument("--out", help="write all results (mAP, timings, curves) to this JSON file")
    add_quiet_option(parser)
    parser.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)
    trained = parser.add_argument_group("a trained model instead of saved features")
    trained.add_argument("--model", metavar="CKPT_DIR", help="a checkpoint directory of any method")
    trained.add_argument(
        "--images",
        metavar="SOURCE",
        help="the labelled source the split indexes (any source `dpq train` accepts)",
    )
    trained.add_argument(
        "--split",
        metavar="FILE",
        help="a split (`dpq data split`, or the split.json of a run): query and database rows, "
        "and the training rows the baselines are fitted on",
    )
    add_source_options(parser)
    add_device_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.model is not None or args.images is not None or args.split is not None:
        return _trained_model(args)
    return _saved_features(args)


def _saved_features(args: argparse.Namespace) -> int:
    from dpq.atomic import write_json_atomic
    from dpq.evaluate.report import format_map_table
    from dpq.evaluate.workflows import evaluate_feature_files

    missing = missing_flags(args, "query_features", "query_labels", "db_labels")
    if missing:
        raise ValueError(
            f"missing {', '.join(missing)}: give saved features and labels, or a trained model "
            "with --model CKPT_DIR --images SOURCE --split FILE."
        )
    if image_flags_given(args):
        raise ValueError(
            f"{', '.join(image_flags_given(args))} apply to --images (a trained model's "
            "source), not to saved features."
        )
    check_out(args)
    methods = parse_methods(args.method) + parse_methods(args.baselines)
    evaluation = evaluate_feature_files(
        {name: getattr(args, name) for name in FEATURE_FLAGS},
        methods + ["float"] * args.float_reference,
        bits=parse_bits(args.bits),
        index=args.index,
        metric=args.metric,
        r=args.r,
        seed=args.seed,
        progress=not args.quiet,
    )
    for note in evaluation.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"mAP@{evaluation.r} over {evaluation.n_queries} queries, {evaluation.n_database} items")
    print(format_map_table(evaluation.map_table()))
    if evaluation.float_reference() is not None:
        print(f"float features (no quantization): {evaluation.float_reference():.3f}")
    if args.out:
        print(f"wrote {write_json_atomic(args.out, evaluation.to_dict())}")
    return 0


def _trained_model(args: argparse.Namespace) -> int:
    """`dpq evaluate --model --images --split`: features, codes, float search, baselines."""
    from dpq.atomic import write_json_atomic
    from dpq.evaluate.report import format_map_table, format_results_table
    from dpq.evaluate.workflows import evaluate_checkpoint

    missing = missing_flags(args, "model", "images", "split")
    if missing:
        raise ValueError(f"evaluating a trained model needs {', '.join(missing)} as well.")
    features_given = [
        flag
        for flag in ("query_features", "query_labels", "db_features", "db_labels", "index")
        if getattr(args, flag) is not None
    ]
    if features_given or args.method is not None:
        given = ", ".join("--" + flag.replace("_", "-") for flag in features_given) or "--method"
        raise ValueError(
            f"{given} belong to the saved-features mode; with --model the features, codes and "
            "index come from the model (name baselines with --baselines)."
        )
    check_out(args)
    baselines = parse_methods(args.baselines)
    evaluation = evaluate_checkpoint(
        args.model,
        args.images,
        args.split,
        baselines=baselines,
        r=args.r,
        device=args.device,
        workers=args.workers,
        progress=not args.quiet,
        **source_options(args),
    )
    if args.bits != DEFAULT_BITS:
        lengths = ", ".join(str(bits) for bits in evaluation.map_by_bits)
        print(
            f"note: with --model the model's code lengths are scored ({lengths} bits); "
            "--bits is ignored.",
            file=sys.stderr,
        )
    print(
        format_results_table(
            evaluation,
            title=f"{args.model}: {evaluation.num_queries} queries, "
            f"{evaluation.num_database} database items",
        )
    )
    if baselines and evaluation.details is not None:
        print(format_map_table(evaluation.details.map_table()))
    if args.out:
        print(f"wrote {write_json_atomic(args.out, evaluation.to_dict())}")
    return 0
