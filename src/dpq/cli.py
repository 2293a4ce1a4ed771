"""Command-line interface: argument parsing only. Each sub-command calls the library.

Tests call ``main([...])`` directly. Errors a user can fix (``ValueError``,
``FileNotFoundError``) print one line to stderr and return exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    info = data_sub.add_parser(
        "info", help="counts per class, image size and protocol split sizes of a dataset"
    )
    info.add_argument(
        "source",
        help="CIFAR-10 (cifar-10-python.tar.gz, its extracted folder, or a folder/zip of "
        "<train|test>/<class>/<image>), a folder or zip of <class>/<image>, or a DVSQ/DPQ "
        "list file (.txt); the kind is detected",
    )
    info.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="skip images that cannot be decoded (counted in a warning) instead of stopping "
        "at the first one",
    )
    info.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="N",
        help="resize images to N x N (needed for an image folder whose images differ in size)",
    )
    info.add_argument(
        "--root",
        default=None,
        help="list files only: the folder or zip holding the listed images (without it only "
        "the labels are summarised)",
    )
    info.add_argument(
        "--strip-prefix",
        default=None,
        metavar="PREFIX",
        help="list files only: leading part of the listed absolute paths to replace by --root "
        "(default: found from the first line)",
    )
    info.add_argument(
        "--cache-dir",
        default=None,
        help="where decoded CIFAR-10 arrays are cached (default: $DPQ_CACHE_DIR or ~/.cache/dpq)",
    )
    info.add_argument(
        "--seed", type=int, default=0, help="seed of the protocol split whose sizes are shown"
    )
    info.set_defaults(func=_cmd_data_info)

    split = data_sub.add_parser(
        "split",
        help="draw a per-class protocol split (training/query/database indices) and save it",
        description="Draw N_TRAIN training and N_QUERY query items per class; the database is "
        "every other item (the CIFAR-10 protocol of the DPQ paper with the defaults 500/100). "
        "Indices follow the loader's order (CIFAR-10: train then test, classes in CIFAR order).",
    )
    split.add_argument("source", help="any source that `dpq data info` accepts")
    split.add_argument(
        "--out", required=True, help="where to write the split: a .json or .npz file"
    )
    split.add_argument("--n-train", type=int, default=500, help="training items per class")
    split.add_argument("--n-query", type=int, default=100, help="query items per class")
    split.add_argument("--seed", type=int, default=0, help="random seed (same seed, same split)")
    split.add_argument(
        "--train-in-database",
        action="store_true",
        help="keep the training items in the database (the paper leaves them out)",
    )
    split.add_argument(
        "--skip-corrupt", action="store_true", help="skip images that cannot be decoded"
    )
    split.add_argument(
        "--image-size", type=int, default=None, metavar="N", help="resize images to N x N"
    )
    split.add_argument(
        "--cache-dir", default=None, help="CIFAR-10 decoded-array cache (default: $DPQ_CACHE_DIR)"
    )
    split.set_defaults(func=_cmd_data_split)


def _cmd_data_info(args: argparse.Namespace) -> int:
    from dpq.data.info import describe_source

    info = describe_source(
        args.source,
        skip_corrupt=args.skip_corrupt,
        image_size=args.image_size,
        root=args.root,
        strip_prefix=args.strip_prefix,
        cache_dir=args.cache_dir,
        seed=args.seed,
    )
    print(info.format())
    return 0


def _cmd_data_split(args: argparse.Namespace) -> int:
    from dpq.data.info import source_labels
    from dpq.data.splits import split_per_class

    labels, classes = source_labels(
        args.source,
        skip_corrupt=args.skip_corrupt,
        image_size=args.image_size,
        cache_dir=args.cache_dir,
    )
    split = split_per_class(
        labels,
        args.n_train,
        args.n_query,
        seed=args.seed,
        classes=classes,
        train_in_database=args.train_in_database,
    )
    split.save(args.out)
    sizes = split.sizes
    print(
        f"train {sizes['train']:,} / query {sizes['query']:,} / database {sizes['database']:,} "
        f"(seed {args.seed}) written to {args.out}"
    )
    return 0


# ---------------------------------------------------------------- model commands: train, demo, reproduce


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `train` and `reproduce`: a recipe file, an ablation, and overrides."""
    from dpq.config import ABLATIONS, SCHEDULES

    recipe = parser.add_argument_group("recipe (a JSON config, then an ablation, then flags)")
    recipe.add_argument(
        "--config",
        metavar="RECIPE",
        help="a recipe name (default, cifar10) or a DPQ config JSON file (sections "
        "model/quantizer/loss/train; missing keys take the defaults), e.g. the config.json of "
        "a checkpoint. `train` starts from 'default', `reproduce` from 'cifar10'",
    )
    recipe.add_argument(
        "--ablation",
        default="full",
        choices=list(ABLATIONS),
        help="a named configuration of the paper's Table 2 applied on top of the recipe "
        "(default: full)",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", help="resnet9, small_cnn, torchvision:<name>, timm:<name>")
    model.add_argument("--width", type=float, help="channel multiplier of resnet9 / small_cnn")
    model.add_argument("--num-levels", type=int, metavar="L", help="quantization levels (4)")
    model.add_argument(
        "--codebook-size", type=int, metavar="K", help="codewords per level, a power of two (256)"
    )
    model.add_argument("--dim", type=int, metavar="D", help="semantic feature size (300)")
    model.add_argument("--temperature", type=float, help="soft assignment softmax(s / temperature)")
    model.add_argument(
        "--similarity", choices=["euclidean", "cosine"], help="s of the soft assignment"
    )
    model.add_argument(
        "--assignment", choices=["euclidean", "cosine"], help="hard assignment rule of the codes"
    )
    model.add_argument(
        "--tta-flip", action="store_true", default=None, help="average features with the mirror"
    )
    model.add_argument(
        "--feature",
        choices=["semantic", "class_posterior"],
        help="what is quantized: semantic (the paper's tanh features, searched by AQD) or "
        "class_posterior (the classifier's class probabilities, searched by inner product: "
        "p_q . p_x ranks by the chance that two images share their class)",
    )
    model.add_argument(
        "--posterior-temperature",
        type=float,
        metavar="T",
        help="class_posterior features are softmax(logits / T) (default 1)",
    )
    loss = parser.add_argument_group("losses")
    loss.add_argument("--tau", type=float, help="weight of the quantization loss E")
    loss.add_argument("--lambda-cls", type=float, help="weight of the classification loss")
    loss.add_argument("--label-smoothing", type=float, help="label smoothing of L_C")
    train = parser.add_argument_group("training")
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, help="number of epochs")
    budget.add_argument(
        "--minutes",
        type=float,
        help="training time budget: the step speed is measured and the epochs that fit are fixed",
    )
    train.add_argument("--batch-size", type=int, help="images per step")
    train.add_argument("--lr", type=float, help="peak learning rate of the network")
    train.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], help="network optimizer")
    train.add_argument("--schedule", choices=list(SCHEDULES), help="training schedule")
    train.add_argument(
        "--quantization-start",
        type=float,
        metavar="FRACTION",
        help="fraction of the epochs before the quantization losses start",
    )
    train.add_argument("--cutout", type=int, metavar="PIXELS", help="cutout square side (0: off)")
    train.add_argument("--mixup", type=float, metavar="ALPHA", help="mixup alpha (0: off)")
    train.add_argument(
        "--randaugment",
        type=int,
        metavar="N",
        help="RandAugment operations per training image (0: off)",
    )
    train.add_argument(
        "--randaugment-magnitude",
        type=int,
        metavar="M",
        help="strength of the RandAugment operations, 0..30 (torchvision's scale; default 9)",
    )
    train.add_argument("--ema", type=float, metavar="DECAY", help="weight EMA decay (0: off)")
    train.add_argument(
        "--bf16", action="store_true", default=None, help="bfloat16 autocast for the network"
    )
    train.add_argument(
        "--channels-last", action="store_true", default=None, help="channels-last convolutions"
    )
    train.add_argument("--seed", type=int, help="seed of init, shuffling and augmentation")
    parser.add_argument(
        "--word-vectors",
        metavar="PATH",
        help="label word vectors, one row per class (needed by the semantic loss); "
        "'orthogonal' uses seeded orthonormal class vectors",
    )
    parser.add_argument("--out", required=True, help="output directory of the run")
    parser.add_argument(
        "--resume", action="store_true", help="continue the interrupted run in --out"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines")


def _recipe_from_args(args: argparse.Namespace, default: str = "default"):  # -> DPQConfig
    """The recipe (``--config``, else ``default``) with the flags that were given on top."""
    from dpq.config import load_recipe

    base = load_recipe(args.config or default)
    sections: dict[str, dict[str, object]] = {"model": {}, "quantizer": {}, "loss": {}, "train": {}}
    flags = {
        ("model", "backbone"): args.backbone,
        ("model", "tta_flip"): args.tta_flip,
        ("model", "feature"): args.feature,
        ("model", "posterior_temperature"): args.posterior_temperature,
        ("quantizer", "num_levels"): args.num_levels,
        ("quantizer", "codebook_size"): args.codebook_size,
        ("quantizer", "dim"): args.dim,
        ("quantizer", "temperature"): args.temperature,
        ("quantizer", "similarity"): args.similarity,
        ("quantizer", "assignment"): args.assignment,
        ("loss", "tau"): args.tau,
        ("loss", "lambda_cls"): args.lambda_cls,
        ("loss", "label_smoothing"): args.label_smoothing,
        ("train", "batch_size"): args.batch_size,
        ("train", "lr"): args.lr,
        ("train", "optimizer"): args.optimizer,
        ("train", "schedule"): args.schedule,
        ("train", "quantization_start"): args.quantization_start,
        ("train", "cutout"): args.cutout,
        ("train", "mixup_alpha"): args.mixup,
        ("train", "randaugment_ops"): args.randaugment,
        ("train", "randaugment_magnitude"): args.randaugment_magnitude,
        ("train", "ema_decay"): args.ema,
        ("train", "bf16"): args.bf16,
        ("train", "channels_last"): args.channels_last,
        ("train", "seed"): args.seed,
    }
    for (section, name), value in flags.items():
        if value is not None:
            sections[section][name] = value
    if args.width is not None:
        sections["model"]["backbone_kwargs"] = {**base.model.backbone_kwargs, "width": args.width}
    if args.backbone is not None and args.width is None and args.backbone != base.model.backbone:
        sections["model"]["backbone_kwargs"] = {}
    if args.epochs is not None:
        sections["train"].update(epochs=args.epochs, time_budget_minutes=None)
    if args.minutes is not None:
        sections["train"]["time_budget_minutes"] = args.minutes
    return base.replace(**sections)


def _log_for(args: argparse.Namespace):
    return (lambda message: None) if args.quiet else None


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="train a DPQ model on a labelled collection",
        description="Train one DPQ model (backbone, semantic head, classifier, L quantization "
        "levels). Checkpoints are written every epoch into --out/checkpoints; the final "
        "model goes to --out/model (model.safetensors + config.json).",
    )
    train.add_argument(
        "data",
        nargs="?",
        help="'digits', a CIFAR-10 source, a folder/zip of <class>/<image>, or a list file",
    )
    train.add_argument("--features", metavar="NPY", help="precomputed float features (N, F)")
    train.add_argument("--labels", metavar="NPY", help="labels of --features")
    train.add_argument("--image-root", help="list files: folder or zip holding the images")
    train.add_argument("--image-size", type=int, metavar="N", help="resize images to N x N")
    train.add_argument(
        "--split",
        choices=["auto", "all", "per-class"],
        default="auto",
        help="train on everything (all), or on a per-class draw (per-class); auto: per-class "
        "500/100 for CIFAR-10, all otherwise",
    )
    train.add_argument("--train-per-class", type=int, default=500, help="per-class split")
    train.add_argument("--query-per-class", type=int, default=100, help="per-class split")
    train.add_argument("--split-seed", type=int, default=0, help="seed of the per-class split")
    _add_recipe_options(train)
    train.set_defaults(func=_cmd_train)

    demo = sub.add_parser(
        "demo",
        help="digits end to end in about a minute: train, encode, search, mAP per code length",
        description="Split sklearn's 8x8 digits per class, train a small CNN with DPQ, encode "
        "the rest as the database, search it with AQD and print mAP@(database size) at "
        "8/16/24/32 bits.",
    )
    demo.add_argument("--epochs", type=int, default=15, help="training epochs (15)")
    demo.add_argument("--train-per-class", type=int, default=50, help="training digits per class")
    demo.add_argument("--query-per-class", type=int, default=10, help="query digits per class")
    demo.add_argument("--num-levels", type=int, default=4, metavar="L", help="levels (4)")
    demo.add_argument(
        "--codebook-size", type=int, default=256, metavar="K", help="codewords per level (256)"
    )
    demo.add_argument("--dim", type=int, default=64, metavar="D", help="feature size (64)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the split and the training")
    demo.add_argument("--out", help="keep the run here (default: a temporary folder)")
    demo.add_argument("--json", action="store_true", help="print the results as JSON")
    demo.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    demo.set_defaults(func=_cmd_demo)

    reproduce = sub.add_parser(
        "reproduce",
        help="the paper's CIFAR-10 protocol with one model: mAP@54000 at 8/16/24/32 bits",
        description="Merge CIFAR-10's 60,000 images, draw 500 training and 100 query images "
        "per class (seed 0), train one model on the 5,000, encode the other 54,000, search "
        "them for the 1,000 queries with AQD and report mAP@54000 per code length. Writes "
        "results.json and results.md into --out.",
    )
    reproduce.add_argument("dataset", choices=["cifar10"], help="the benchmark")
    reproduce.add_argument(
        "--data", help="CIFAR-10 archive, folder or zip (default: download into the cache)"
    )
    reproduce.add_argument(
        "--baselines",
        default="",
        metavar="NAMES",
        help="comma-separated baselines (see `dpq evaluate`) run on the same features and shown "
        "beside DPQ in the report (default: none)",
    )
    _add_recipe_options(reproduce)
    reproduce.set_defaults(func=_cmd_reproduce)


def _cmd_train(args: argparse.Namespace) -> int:
    from dpq.config import ablation_config
    from dpq.experiments import train_from_source
    from dpq.train import TrainingDiverged

    config = ablation_config(args.ablation, _recipe_from_args(args))
    try:
        result = train_from_source(
            config,
            args.out,
            source=args.data,
            features=args.features,
            labels=args.labels,
            image_root=args.image_root,
            image_size=args.image_size,
            split=args.split,
            train_per_class=args.train_per_class,
            query_per_class=args.query_per_class,
            split_seed=args.split_seed,
            word_vectors=args.word_vectors,
            resume=args.resume,
            progress=not args.quiet,
            log=_log_for(args),
        )
    except TrainingDiverged as exc:
        print(f"dpq: error: {exc}", file=sys.stderr)
        return 3
    last = result.history[-1] if result.history else {}
    print(
        f"trained {result.epochs} epochs in {result.wall_seconds:.1f} s; final loss "
        f"{last.get('total', float('nan')):.4g}; model saved to {result.model_dir}"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import json

    from dpq.experiments import run_demo

    results = run_demo(
        out_dir=args.out,
        epochs=args.epochs,
        train_per_class=args.train_per_class,
        query_per_class=args.query_per_class,
        num_levels=args.num_levels,
        codebook_size=args.codebook_size,
        dim=args.dim,
        seed=args.seed,
        progress=not args.quiet,
        log=_log_for(args),
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    split, settings = results["split"], results["settings"]
    print(
        f"dpq demo: {results['dataset']}; {split['train']} train / {split['query']} query / "
        f"{split['database']} database images (seed {split['seed']})"
    )
    print(
        f"{settings['backbone']}, L={settings['num_levels']} K={settings['codebook_size']} "
        f"D={settings['dim']}, {settings['epochs']} epochs, trained in "
        f"{results['wall_seconds']['train']:.1f} s"
    )
    print(results["evaluation_table"])
    print(f"total wall time {results['wall_seconds']['total']:.1f} s")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    import shlex

    from dpq.experiments import format_results_table, reproduce_cifar10
    from dpq.train import TrainingDiverged

    base = _recipe_from_args(args, default="cifar10")
    command = "dpq " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None
    try:
        results = reproduce_cifar10(
            args.out,
            data=args.data,
            ablation=args.ablation,
            base_config=base,
            word_vectors=args.word_vectors,
            resume=args.resume,
            progress=not args.quiet,
            log=_log_for(args),
            command=command,
            baselines=[name for name in args.baselines.split(",") if name],
        )
    except TrainingDiverged as exc:
        print(f"dpq: error: {exc}", file=sys.stderr)
        return 3
    from dpq.experiments import RetrievalEvaluation

    evaluation = results["evaluation"]
    table = format_results_table(
        RetrievalEvaluation(
            map_by_bits={int(b): v for b, v in evaluation["map"].items()},
            r=evaluation["r"],
            float_map=evaluation["float_map"],
            query_accuracy=evaluation["query_accuracy"],
            seconds=evaluation["seconds"],
            num_queries=evaluation["num_queries"],
            num_database=evaluation["num_database"],
            database_accuracy=evaluation.get("database_accuracy"),
            class_probability_map=evaluation.get("class_probability_map"),
        ),
        title=f"CIFAR-10 ({results['ablation']}), {results['epochs']} epochs",
    )
    print(table)
    wall = results["wall_seconds"]
    print(
        f"wall time: train {wall['train'] / 60:.1f} min, total {wall['total'] / 60:.1f} min; "
        f"results in {args.out}/results.json, report in {args.out}/report/report.md"
    )
    return 0


def _add_evaluate_commands(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser(
        "evaluate",
        help="mAP@R of DPQ and/or baselines on saved features or a trained model, at each "
        "code length",
        description="Score retrieval methods on the same query/database features: mAP@R "
        "(DVSQ/DPQ convention; ties broken by database index) at each code length, printed as "
        "one table (methods x bits) and saved as JSON with timings and, at 32 bits, PR and "
        "precision@R curves. Two inputs: saved features (--query-features, --query-labels, "
        "--db-labels, ...; .npy files, never unpickled; labels are int (N,) class ids or "
        "multi-hot (N, C)), or a trained model with a labelled source and a split (--model, "
        "--images, --split): its features, its codes searched with AQD, the float features "
        "and any --baselines fitted on its training features.",
    )
    evaluate.add_argument("--query-features", help="float (nq, D) .npy query features")
    evaluate.add_argument(
        "--query-labels", help="query labels .npy, int (nq,) or multi-hot (nq, C)"
    )
    evaluate.add_argument(
        "--db-features",
        help="float (N, D) .npy database features (needed by baselines; optional for --method dpq)",
    )
    evaluate.add_argument("--db-labels", help="database labels .npy, int (N,) or multi-hot (N, C)")
    evaluate.add_argument(
        "--train-features",
        help="float .npy features the baselines are fitted on (default: the database features)",
    )
    evaluate.add_argument("--train-labels", help="labels of --train-features (used by itq-cca)")
    evaluate.add_argument(
        "--method",
        help="one method: dpq (needs --index), a baseline name (pq, opq, rq, lsq, itq, itq-cca, "
        "lsh) or float (exhaustive L2 on the unquantized features)",
    )
    evaluate.add_argument(
        "--baselines",
        help="baselines run in the same pass: 'all' or a comma list such as pq,opq,itq",
    )
    evaluate.add_argument(
        "--index",
        help="DPQ index file (dpq.index.DPQIndex) of the database, items in --db-labels order",
    )
    evaluate.add_argument(
        "--metric",
        choices=["l2", "ip"],
        help="how float features and the quantization baselines rank: l2 (squared "
        "Euclidean) or ip (inner product, for class-posterior features); default: ip when "
        "--index is searched by inner product, else l2",
    )
    evaluate.add_argument(
        "--bits", default="8,16,24,32", help="code lengths, comma-separated (default: 8,16,24,32)"
    )
    evaluate.add_argument(
        "--r", type=int, default=None, help="mAP@R cutoff (default: the whole database)"
    )
    evaluate.add_argument(
        "--float-reference",
        action="store_true",
        help="also score exhaustive L2 search on the unquantized features (a reference row)",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of every baseline (default: 0)")
    evaluate.add_argument(
        "--out", help="write all results (mAP, timings, curves) to this JSON file"
    )
    evaluate.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    trained = evaluate.add_argument_group("a trained model instead of saved features")
    trained.add_argument("--model", metavar="CKPT_DIR", help="a DPQ checkpoint directory")
    trained.add_argument(
        "--images",
        metavar="SOURCE",
        help="the labelled source the split indexes: 'digits', a CIFAR-10 source, a "
        "folder/zip of <class>/<image> or a list file",
    )
    trained.add_argument(
        "--split",
        metavar="FILE",
        help="a split (`dpq data split`, or the split.json of a run): query and database rows, "
        "and the training rows the baselines are fitted on",
    )
    trained.add_argument("--image-root", help="list files: folder or zip holding the images")
    trained.add_argument("--image-size", type=int, metavar="N", help="resize images to N x N")
    evaluate.set_defaults(func=_cmd_evaluate)


def _missing_flags(args: argparse.Namespace, *names: str) -> list[str]:
    """The command-line spelling (--query-features) of each of ``names`` that was not given."""
    return ["--" + name.replace("_", "-") for name in names if getattr(args, name) is None]


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dpq.baselines.evaluation import (
        FLOAT_METHOD,
        FeatureSet,
        evaluate_methods,
        parse_bits,
        parse_methods,
    )
    from dpq.report import format_map_table, write_json

    if args.model is not None or args.images is not None or args.split is not None:
        return _evaluate_model(args)
    missing = _missing_flags(args, "query_features", "query_labels", "db_labels")
    if missing:
        raise ValueError(
            f"missing {', '.join(missing)}: give saved features and labels, or a trained model "
            "with --model CKPT_DIR --images SOURCE --split FILE."
        )
    methods = parse_methods(args.method) + parse_methods(args.baselines)
    if args.float_reference:
        methods.append(FLOAT_METHOD)
    features = FeatureSet.from_files(
        query_features=args.query_features,
        query_labels=args.query_labels,
        db_features=args.db_features,
        db_labels=args.db_labels,
        train_features=args.train_features,
        train_labels=args.train_labels,
    )
    index = None
    if args.index is not None:
        from dpq.index import DPQIndex

        index = DPQIndex.load(args.index)
    metric = args.metric
    if metric is None:  # the way the index is searched, else Euclidean
        metric = "ip" if index is not None and index.search_mode == "ip" else "l2"
    features = dataclasses.replace(features, metric=metric)
    evaluation = evaluate_methods(
        features,
        list(dict.fromkeys(methods)),
        bits=parse_bits(args.bits),
        r=args.r,
        dpq_index=index,
        seed=args.seed,
        progress=not args.no_progress,
    )
    for note in evaluation.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"mAP@{evaluation.r} over {evaluation.n_queries} queries, {evaluation.n_database} items")
    print(format_map_table(evaluation.map_table()))
    if evaluation.float_reference() is not None:
        print(f"float features (no quantization): {evaluation.float_reference():.3f}")
    if args.out:
        print(f"wrote {write_json(args.out, evaluation.to_dict())}")
    return 0


def _evaluate_model(args: argparse.Namespace) -> int:
    """`dpq evaluate --model --images --split`: features, AQD over the codes, baselines."""
    from dpq.baselines.evaluation import parse_methods
    from dpq.data.splits import Split
    from dpq.experiments import evaluate_retrieval, format_results_table
    from dpq.model import DPQModel
    from dpq.report import format_map_table, write_json
    from dpq.train import load_training_source

    missing = _missing_flags(args, "model", "images", "split")
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
    model = DPQModel.from_checkpoint(args.model)
    if args.bits != "8,16,24,32":
        print(
            "note: with --model every prefix of the model's codes is scored "
            f"({model.config.quantizer.num_levels} levels of "
            f"{model.config.quantizer.bits_per_level} bits); --bits is ignored.",
            file=sys.stderr,
        )
    inputs, labels, _, _ = load_training_source(
        args.images, image_root=args.image_root, image_size=args.image_size
    )
    split = Split.load(args.split)
    for name in ("query", "database", "train"):
        rows = getattr(split, name)
        if rows.size and rows.max() >= len(inputs):
            raise ValueError(
                f"{args.split} indexes {name} rows up to {rows.max()} but {args.images} has "
                f"{len(inputs)} items; make the split from the same source."
            )
    baselines = tuple(parse_methods(args.baselines))
    evaluation = evaluate_retrieval(
        model,
        inputs[split.query],
        labels[split.query],
        inputs[split.database],
        labels[split.database],
        r=args.r,
        baselines=baselines,
        train_inputs=inputs[split.train] if len(split.train) else None,
        train_labels=labels[split.train] if len(split.train) else None,
        curves=True,
        progress=not args.no_progress,
    )
    print(
        format_results_table(
            evaluation,
            title=f"{args.model}: {evaluation.num_queries} queries, "
            f"{evaluation.num_database} database items",
        )
    )
    if baselines:
        print(format_map_table(evaluation.details.map_table()))
    if args.out:
        print(f"wrote {write_json(args.out, evaluation.to_dict())}")
    return 0


# ---------------------------------------------------------------- index commands: encode, search


def _add_index_commands(sub: argparse._SubParsersAction) -> None:
    encode = sub.add_parser(
        "encode",
        help="encode a database into a DPQ index file (codes + codebooks + ids + labels)",
        description="Encode items with a model's codebooks (greedy residual hard assignment, "
        "the model's rule) and write one index file (.npz, no pickle, with a checksum) that "
        "`dpq search`, `dpq evaluate --index` and dpq.index.DPQIndex.load read.",
    )
    books = encode.add_mutually_exclusive_group(required=True)
    books.add_argument("--model", metavar="CKPT_DIR", help="a DPQ checkpoint directory")
    books.add_argument(
        "--codebooks",
        metavar="NPY",
        help="instead of --model: float32 (L, K, D) codebooks; then --features are the "
        "semantic features (N, D) to encode",
    )
    items = encode.add_mutually_exclusive_group(required=True)
    items.add_argument(
        "--images",
        metavar="SOURCE",
        help="needs --model: 'digits', a CIFAR-10 source, a folder/zip of <class>/<image> or "
        "a list file; labels come from it unless --labels is given",
    )
    items.add_argument(
        "--features",
        metavar="NPY",
        help="float (N, F) .npy: model inputs with --model (e.g. backbone features for an "
        "'identity' backbone), semantic features (N, D) with --codebooks",
    )
    encode.add_argument("--labels", metavar="NPY", help="int (N,) or multi-hot (N, C) labels")
    encode.add_argument("--ids", metavar="NPY", help="int64 (N,) item ids (default: row numbers)")
    encode.add_argument(
        "--split",
        metavar="FILE",
        help="a split from `dpq data split`: encode only its --subset rows (ids stay the "
        "row numbers in the source)",
    )
    encode.add_argument(
        "--subset",
        choices=["database", "query", "train"],
        default="database",
        help="which part of --split to encode (default: database)",
    )
    encode.add_argument(
        "--assignment",
        choices=["euclidean", "cosine"],
        default=None,
        help="hard assignment rule (default: the model's; euclidean with --codebooks)",
    )
    encode.add_argument(
        "--search-mode",
        choices=["aqd", "ip"],
        default=None,
        help="how the index is searched unless `dpq search --mode` says otherwise (default: "
        "the model's, ip for class-posterior features; aqd with --codebooks)",
    )
    encode.add_argument("--image-root", help="list files: the folder or zip holding the images")
    encode.add_argument("--image-size", type=int, metavar="N", help="resize images to N x N")
    encode.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    encode.add_argument("--out", required=True, help="the index file to write (.npz)")
    encode.add_argument("--quiet", action="store_true", help="no progress bars")
    encode.set_defaults(func=_cmd_encode)

    search = sub.add_parser(
        "search",
        help="search a DPQ index with query features or images; top-k as JSON or CSV",
        description="Rank the index items for each query by Asymmetric Quantization Distance "
        "(lookup tables over the first --num-levels codes) and print the top k ids, "
        "distances and, when the index has them, labels.",
    )
    search.add_argument("--index", required=True, help="an index file written by `dpq encode`")
    queries = search.add_mutually_exclusive_group(required=True)
    queries.add_argument(
        "--features",
        metavar="NPY",
        help="float .npy queries: semantic features (nq, D), or model inputs with --model",
    )
    queries.add_argument(
        "--images", metavar="SOURCE", help="query images (needs --model); any `dpq encode` source"
    )
    search.add_argument(
        "--model",
        metavar="CKPT_DIR",
        help="the checkpoint that built the index (checked against the index's codebooks)",
    )
    search.add_argument(
        "--split", metavar="FILE", help="with --images: search only the --subset rows"
    )
    search.add_argument(
        "--subset",
        choices=["database", "query", "train"],
        default="query",
        help="which part of --split to search with (default: query)",
    )
    search.add_argument("--image-root", help="list files: the folder or zip holding the images")
    search.add_argument("--image-size", type=int, metavar="N", help="resize images to N x N")
    search.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    search.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    search.add_argument(
        "--num-levels",
        type=int,
        default=None,
        metavar="L",
        help="search with the first L codes only (L * log2 K bits; default: all)",
    )
    search.add_argument(
        "--mode",
        choices=["aqd", "ip"],
        default=None,
        help="aqd: squared distance to the reconstruction (Eq. 30); ip: inner product, "
        "reported as its negative (default: the index's search mode, set when it was built)",
    )
    search.add_argument(
        "--rerank-from",
        type=int,
        default=None,
        metavar="L0",
        help="shortlist with the first L0 codes, then re-rank the shortlist with all",
    )
    search.add_argument(
        "--rerank-candidates",
        type=int,
        default=None,
        help="shortlist size for --rerank-from (default: max(10 k, 100))",
    )
    search.add_argument(
        "--format",
        choices=["json", "csv"],
        default="json",
        help="json: one object per query with ids, distances (and labels); csv: one row per "
        "result, query,rank,id,distance[,label] (default: json)",
    )
    search.add_argument("--out", help="write the results to this file instead of stdout")
    search.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    search.set_defaults(func=_cmd_search)


def _read_npy(path: str, what: str):  # -> np.ndarray
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable .npy array for {what}: {exc}") from None


def _model_inputs(args: argparse.Namespace):  # -> (inputs, labels or None, row ids or None)
    """Rows to encode/search: --features as given, or --images loaded (and --split applied)."""
    import numpy as np

    if args.features is not None:
        return _read_npy(args.features, "--features"), None, None
    if args.model is None:
        raise ValueError("--images needs --model: the checkpoint that turns images into features.")
    from dpq.train import load_training_source

    inputs, labels, classes, _ = load_training_source(
        args.images, image_root=args.image_root, image_size=args.image_size
    )
    args.classes = list(classes)
    rows = None
    if args.split is not None:
        from dpq.data.splits import Split

        rows = getattr(Split.load(args.split), args.subset)
        if rows.size and rows.max() >= len(inputs):
            raise ValueError(
                f"{args.split} indexes rows up to {rows.max()} but {args.images} has "
                f"{len(inputs)} items; make the split from the same source."
            )
        inputs, labels = inputs[rows], labels[rows]
    return inputs, labels, (None if rows is None else np.asarray(rows, np.int64))


def _features_from_model(model, inputs, args: argparse.Namespace):  # -> np.ndarray
    import time

    start = time.perf_counter()
    features = model.extract_features(inputs, batch_size=args.batch_size, progress=not args.quiet)
    seconds = time.perf_counter() - start
    if not args.quiet:
        kind = "images" if getattr(inputs, "dtype", None) == "uint8" else "inputs"
        print(
            f"features of {len(features):,} {kind} in {seconds:.1f} s "
            f"({len(features) / max(seconds, 1e-9):,.0f} {kind}/s)",
            file=sys.stderr,
        )
    return features


def _cmd_encode(args: argparse.Namespace) -> int:
    import time

    import numpy as np
    from tqdm.auto import tqdm

    from dpq.index import DPQIndex

    inputs, labels, ids = _model_inputs(args)
    metadata: dict[str, object] = {"created_by": "dpq encode"}
    if args.model is not None:
        from dpq.model import DPQModel

        model = DPQModel.from_checkpoint(args.model)
        codebooks = model.codebooks()
        assignment = args.assignment or model.config.quantizer.assignment
        search_mode = args.search_mode or model.config.model.search_mode
        metadata["model"] = str(args.model)
        features = _features_from_model(model, inputs, args)
    else:
        codebooks = _read_npy(args.codebooks, "--codebooks")
        assignment = args.assignment or "euclidean"
        search_mode = args.search_mode or "aqd"
        metadata["codebooks"] = str(args.codebooks)
        features = inputs
    metadata["source"] = str(args.images or args.features)
    if getattr(args, "classes", None) and args.labels is None:
        metadata["classes"] = args.classes
    if args.labels is not None:
        labels = _read_npy(args.labels, "--labels")
    if args.ids is not None:
        ids = _read_npy(args.ids, "--ids")
    index = DPQIndex(codebooks, assignment=assignment, metadata=metadata, search_mode=search_mode)
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D array (N, D); got shape {features.shape}.")
    for name, values in (("--labels", labels), ("--ids", ids)):
        if values is not None and len(values) != len(features):
            raise ValueError(
                f"{name} has {len(values)} rows but there are {len(features)} items; give one "
                "per item, in the same order."
            )
    step = 65536
    start_time = time.perf_counter()
    with tqdm(total=len(features), desc="encode", unit="item", disable=args.quiet) as bar:
        for start in range(0, len(features), step):
            stop = start + step
            index.add_features(
                features[start:stop],
                ids=None if ids is None else ids[start:stop],
                labels=None if labels is None else labels[start:stop],
            )
            bar.update(min(stop, len(features)) - start)
    seconds = time.perf_counter() - start_time
    path = index.save(args.out)
    bits = index.num_levels * int(np.log2(index.codebook_size))
    print(
        f"wrote {path}: {index.ntotal:,} items, {index.num_levels} levels x {index.codebook_size} "
        f"codewords (up to {bits} bits), dim {index.dim}, assignment {index.assignment}, "
        f"search {index.search_mode}, "
        f"labels {'yes' if index.labels is not None else 'no'}; encoded in {seconds:.1f} s "
        f"({index.ntotal / max(seconds, 1e-9):,.0f} items/s)"
    )
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from dpq.index import DPQIndex, format_search_results

    index = DPQIndex.load(args.index)
    queries, _, query_ids = _model_inputs(args)
    if args.model is not None:
        from dpq.model import DPQModel

        model = DPQModel.from_checkpoint(args.model)
        index.check_compatible(model.codebooks(), source=f"model {args.model}")
        queries = _features_from_model(model, queries, args)
    distances, ids = index.search(
        queries,
        args.k,
        num_levels=args.num_levels,
        mode=args.mode,
        rerank_from=args.rerank_from,
        rerank_candidates=args.rerank_candidates,
    )
    text = format_search_results(index, distances, ids, args.format, query_ids=query_ids)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    from dpq.atomic import write_text_atomic

    write_text_atomic(args.out, text)
    if not args.quiet:
        print(f"wrote top-{args.k} of {len(ids):,} queries to {args.out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- serve (the HTTP service)


def _add_serve_command(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve an index over HTTP: JSON API, Prometheus metrics and a search page at /",
        description="Search an index over HTTP (FastAPI + uvicorn; the `serve` extra): POST "
        "/search by image (with --model), vector or id at any code length, add and delete "
        "items (journalled, durable before the answer), a web page at /, API docs at /docs.",
    )
    serve.add_argument("--index", required=True, help="an index file written by `dpq encode`")
    serve.add_argument("--model", metavar="CKPT_DIR", help="its model: accept image queries")
    serve.add_argument(
        "--images",
        metavar="SOURCE",
        help="the source the index was encoded from (its ids are row numbers): thumbnails",
    )
    serve.add_argument("--image-root", help="list files: the folder or zip holding the images")
    serve.add_argument("--image-size", type=int, metavar="N", help="the model's input size N x N")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free)")
    serve.add_argument(
        "--api-key",
        help="key required for writes (default: the DPQ_API_KEY environment variable; "
        "neither: writes are open)",
    )
    serve.add_argument(
        "--max-upload-mb", type=float, default=10.0, help="request body limit (default 10 MB)"
    )
    serve.add_argument(
        "--rate-limit",
        type=float,
        default=0.0,
        metavar="R",
        help="requests per second per client address (default 0: unlimited)",
    )
    serve.add_argument("--rate-burst", type=int, help="burst size of --rate-limit (default 2 R)")
    serve.add_argument("--threads", type=int, help="search threads (default: CPU count)")
    serve.add_argument(
        "--model-threads", type=int, help="torch threads for the model (default: torch's)"
    )
    serve.add_argument(
        "--max-pending", type=int, default=256, help="requests waiting beyond this get 503"
    )
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from dpq.serve import serve

    serve(
        args.index,
        args.model,
        args.images,
        host=args.host,
        port=args.port,
        access_log=args.access_log,
        image_root=args.image_root,
        image_size=args.image_size,
        api_key=args.api_key,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        threads=args.threads,
        model_threads=args.model_threads,
        max_pending=args.max_pending,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpq",
        description=(
            "Deep Progressive Quantization for image retrieval: train one model that gives "
            "8/16/24/32-bit codes, encode a database, search it with lookup tables, evaluate."
        ),
    )
    from dpq import __version__

    parser.add_argument("--version", action="version", version=f"dpq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data_commands(sub)
    _add_evaluate_commands(sub)
    _add_model_commands(sub)
    _add_index_commands(sub)
    _add_serve_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dpq: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
