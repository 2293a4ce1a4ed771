"""Command-line interface: argument parsing and printing only; each command calls the library.

Tests call ``main([...])`` directly. A mistake a user can fix (a missing or unreadable file,
a bad value, conflicting flags) prints one line ``dpq: error: ...`` to stderr and returns
exit code 2; a training that diverged returns 3; Ctrl-C returns 130 without a traceback; a
closed pipe (``dpq ... | head``) ends quietly.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
SOURCE_HELP = (
    "'digits', CIFAR-10 (cifar-10-python.tar.gz, its extracted folder, or a folder/zip of "
    "<train|test>/<class>/<image>), a folder or zip of <class>/<image> (your own "
    "collection), or a DVSQ/DPQ list file (.txt, with --image-root)"
)


# ---------------------------------------------------------------------------- shared options


def _add_source_options(parser: argparse.ArgumentParser, cache: bool = False) -> None:
    """How an image source is read: the same flags wherever a source is read."""
    group = parser.add_argument_group("reading an image source")
    group.add_argument(
        "--image-root", help="list files: the folder or zip holding the listed images"
    )
    group.add_argument(
        "--strip-prefix",
        metavar="PREFIX",
        help="list files: leading part of the listed absolute paths to replace by --image-root "
        "(default: found from the first line)",
    )
    group.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="resize images to N x N (needed for a folder whose images differ in size; list "
        "files default to 256)",
    )
    group.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="leave out images that cannot be decoded (counted in a warning) instead of "
        "stopping at the first one",
    )
    group.add_argument(
        "--loading",
        choices=["auto", "memory", "stream"],
        default="auto",
        help="folders, zips and list files: decode every image up front (memory), or read "
        "them on demand in --workers processes, memory bounded whatever the collection's "
        "size (stream); auto: memory when the decoded images fit a quarter of RAM",
    )
    if cache:
        group.add_argument(
            "--cache-dir",
            help="where decoded CIFAR-10 arrays are cached (default: $DPQ_CACHE_DIR or "
            "~/.cache/dpq)",
        )


def _load_source(args: argparse.Namespace, spec: Any = None, **extra: Any):  # -> Source
    from dpq.data import load_source
    from dpq.data.sources import loading_mode

    extra.setdefault("in_memory", loading_mode(args.loading))
    return load_source(
        spec,
        image_root=args.image_root,
        image_size=args.image_size,
        strip_prefix=args.strip_prefix,
        skip_corrupt=args.skip_corrupt,
        cache_dir=getattr(args, "cache_dir", None),
        progress=not args.quiet,
        **extra,
    )


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    """Where a model runs and how many processes read its images (issue 14)."""
    group = parser.add_argument_group("hardware")
    group.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help="auto (a CUDA GPU where there is one, else the CPU), cpu, cuda, cuda:N or mps; "
        "a model trained on one device runs on any other",
    )
    group.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes decoding images read on demand (default: one per core, up to 8; 0: "
        "the main process)",
    )


def _load_model(args: argparse.Namespace, path: str):  # -> DPQModel on --device
    from dpq.devices import resolve_device
    from dpq.model.network import DPQModel

    return DPQModel.from_checkpoint(path, device=resolve_device(args.device))


def _image_flags_given(args: argparse.Namespace) -> list[str]:
    names = ("image_root", "strip_prefix", "image_size", "split")
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is not None]
    return given + (["--skip-corrupt"] if getattr(args, "skip_corrupt", False) else [])


def _read_array(path: str, what: str):  # -> np.ndarray
    from dpq.data import read_array

    return read_array(path, what)


def _quiet_flag(parser: argparse.ArgumentParser, what: str = "progress output") -> None:
    parser.add_argument("--quiet", action="store_true", help=f"no {what} on stderr")


def _log_for(args: argparse.Namespace):
    return (lambda message: None) if args.quiet else None


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _parse_methods(text: str | None) -> list[str]:
    """``"all"`` -> every baseline; ``"pq,opq"`` -> ["pq", "opq"]; None/"" -> []."""
    from dpq.evaluate.baselines import BASELINES

    if not text:
        return []
    if text.strip() == "all":
        return list(BASELINES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = (*BASELINES, "dpq", "float")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)} or 'all'."
        )
    return list(dict.fromkeys(names))


def _parse_bits(text: str) -> list[int]:
    """``"8,16,24,32"`` -> [8, 16, 24, 32] (positive integers)."""
    try:
        bits = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"bits must be comma-separated integers such as 8,16,24,32; got {text!r}."
        ) from None
    if not bits or min(bits) < 1:
        raise ValueError(f"bits must be positive integers such as 8,16,24,32; got {text!r}.")
    return list(dict.fromkeys(bits))


# ---------------------------------------------------------------------------- data


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="inspect datasets and make protocol splits")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    info = data_sub.add_parser(
        "info",
        help="counts per class, image size and protocol split sizes of a dataset",
        description="Summarise a data source: its kind, images per class, image size and, "
        "for a benchmark, the sizes of its protocol split.",
    )
    info.add_argument("source", help=SOURCE_HELP + "; the kind is detected")
    _add_source_options(info, cache=True)
    info.add_argument(
        "--root", dest="image_root", help=argparse.SUPPRESS
    )  # the flag's name before --image-root
    info.add_argument(
        "--seed", type=int, default=0, help="seed of the protocol split whose sizes are shown"
    )
    _quiet_flag(info)
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
    split.add_argument(
        "--protocol",
        choices=["per-class", "nus-wide"],
        default="per-class",
        help="per-class (CIFAR-10: N_TRAIN and N_QUERY per class, the database the rest) or "
        "nus-wide (multi-label: N_QUERY random queries, the database the rest, N_TRAIN "
        "training items drawn from the database)",
    )
    split.add_argument(
        "--n-train", type=int, default=500, help="training items per class (nus-wide: in all)"
    )
    split.add_argument(
        "--n-query", type=int, default=100, help="query items per class (nus-wide: in all)"
    )
    split.add_argument("--seed", type=int, default=0, help="random seed (same seed, same split)")
    split.add_argument(
        "--train-in-database",
        action="store_true",
        help="keep the training items in the database (the paper leaves them out)",
    )
    _add_source_options(split, cache=True)
    _quiet_flag(split)
    split.set_defaults(func=_cmd_data_split)


def _cmd_data_info(args: argparse.Namespace) -> int:
    from dpq.data.info import describe_source

    info = describe_source(
        args.source,
        skip_corrupt=args.skip_corrupt,
        image_size=args.image_size,
        root=args.image_root,
        strip_prefix=args.strip_prefix,
        cache_dir=args.cache_dir,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(info.format())
    return 0


def _cmd_data_split(args: argparse.Namespace) -> int:
    from dpq.atomic import check_writable_file
    from dpq.data.splits import split_nus_wide, split_per_class

    check_writable_file(args.out, "--out")
    source = _load_source(args, args.source, labels_only=True)
    if args.protocol == "nus-wide":
        split = split_nus_wide(len(source), args.n_query, args.n_train, seed=args.seed)
    elif source.is_multilabel:
        raise ValueError(
            f"{args.source} is multi-label: a per-class split needs one class per item; use "
            "--protocol nus-wide."
        )
    else:
        split = split_per_class(
            source.labels,
            args.n_train,
            args.n_query,
            seed=args.seed,
            classes=source.classes,
            train_in_database=args.train_in_database,
        )
    split.save(args.out)
    sizes = split.sizes
    print(
        f"train {sizes['train']:,} / query {sizes['query']:,} / database {sizes['database']:,} "
        f"(seed {args.seed}) written to {args.out}"
    )
    return 0


# ---------------------------------------------------------------------------- train, demo, reproduce


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `train` and `reproduce`: a recipe file, an ablation, and overrides."""
    from dpq.config import PRECISIONS, SCHEDULES
    from dpq.recipes import ABLATIONS

    recipe = parser.add_argument_group("recipe (a JSON config, then an ablation, then flags)")
    recipe.add_argument(
        "--config",
        metavar="RECIPE",
        help="a recipe name (default, cifar10, paper) or a DPQ config JSON file (sections "
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
        "--precision",
        choices=list(PRECISIONS),
        help="network arithmetic: fp32, bf16, fp16 (GPUs) or auto (bf16 where the hardware has "
        "it natively); the quantizer and losses stay float32",
    )
    train.add_argument(
        "--bf16",
        action="store_const",
        const="bf16",
        dest="precision",
        help="the same as --precision bf16",
    )
    train.add_argument(
        "--channels-last", action="store_true", default=None, help="channels-last convolutions"
    )
    train.add_argument(
        "--weights",
        metavar="PATH",
        help="pretrained backbone weights from a local file (safetensors, or a state dict "
        "saved by torch.save), e.g. torchvision's ImageNet AlexNet for --backbone alexnet; "
        "nothing is downloaded",
    )
    train.add_argument(
        "--backbone-lr-scale",
        type=float,
        metavar="X",
        help="the backbone learns at lr * X (below 1 fine-tunes pretrained layers gently)",
    )
    train.add_argument(
        "--freeze-stages",
        type=int,
        metavar="N",
        help="do not train the first N stages of the backbone (alexnet: conv1..fc7; "
        "resnets: stem, layer1..layer4)",
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
    _add_device_options(parser)
    _quiet_flag(parser, "progress or log lines")


def _recipe_from_args(args: argparse.Namespace, default: str = "default"):  # -> DPQConfig
    """The recipe (``--config``, else ``default``) with the flags that were given on top."""
    from dpq.recipes import ablation_config, load_recipe

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
        ("train", "precision"): args.precision,
        ("train", "channels_last"): args.channels_last,
        ("train", "seed"): args.seed,
        ("train", "backbone_weights"): args.weights,
        ("train", "backbone_lr_scale"): args.backbone_lr_scale,
        ("train", "freeze_stages"): args.freeze_stages,
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
    return ablation_config(args.ablation, base.replace(**sections))


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="train a DPQ model on a labelled collection",
        description="Train one DPQ model (backbone, semantic head, classifier, L quantization "
        "levels). Checkpoints are written every epoch into --out/checkpoints (continue an "
        "interrupted run with --resume); the final model goes to --out/model "
        "(model.safetensors + config.json). The output folder is locked while a run trains "
        "into it.",
    )
    train.add_argument("data", nargs="?", help=SOURCE_HELP)
    train.add_argument(
        "--features", metavar="NPY", help="instead of a source: precomputed float features (N, F)"
    )
    train.add_argument(
        "--labels", metavar="NPY", help="labels of --features: int (N,) class ids or multi-hot"
    )
    _add_source_options(train)
    train.add_argument(
        "--split",
        default="auto",
        metavar="{auto,all,per-class,FILE}",
        help="train on everything (all), on a per-class draw (per-class, saved to "
        "--out/split.json), or on the training rows of a split file (`dpq data split`; the "
        "way for multi-label data); auto: per-class 500/100 for CIFAR-10, all otherwise",
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
    _quiet_flag(demo, "progress or log lines")
    demo.set_defaults(func=_cmd_demo)

    reproduce = sub.add_parser(
        "reproduce",
        help="the paper's CIFAR-10 protocol with one model: mAP@54000 at 8/16/24/32 bits",
        description="Merge CIFAR-10's 60,000 images, draw 500 training and 100 query images "
        "per class (seed --split-seed), train one model on the 5,000, encode the other "
        "54,000, search them for the 1,000 queries and report mAP@54000 per code length. "
        "Writes results.json, results.md and report/ into --out.",
    )
    reproduce.add_argument("dataset", choices=["cifar10"], help="the benchmark")
    reproduce.add_argument(
        "--data", help="CIFAR-10 archive, folder or zip (default: download into the cache)"
    )
    reproduce.add_argument(
        "--split-seed", type=int, default=0, help="seed of the per-class protocol split (0)"
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


def _loading(args: argparse.Namespace):  # -> bool | str
    from dpq.data.sources import loading_mode

    return loading_mode(args.loading)


def _cmd_train(args: argparse.Namespace) -> int:
    from dpq.training.experiments import train_from_source

    config = _recipe_from_args(args)
    split = args.split
    if split not in ("auto", "all", "per-class"):
        from dpq.data import Split

        if not os.path.isfile(split):
            raise ValueError(
                f"--split {split!r} is neither auto, all, per-class nor an existing split file."
            )
        split = Split.load(split)
    result = train_from_source(
        config,
        args.out,
        source=args.data,
        features=args.features,
        labels=args.labels,
        image_root=args.image_root,
        image_size=args.image_size,
        skip_corrupt=args.skip_corrupt,
        split=split,
        train_per_class=args.train_per_class,
        query_per_class=args.query_per_class,
        split_seed=args.split_seed,
        word_vectors=args.word_vectors,
        resume=args.resume,
        progress=not args.quiet,
        log=_log_for(args),
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


def _cmd_demo(args: argparse.Namespace) -> int:
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
        log=_log_for(args),
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


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from dpq.evaluate.report import format_results_table
    from dpq.training.experiments import reproduce_cifar10

    argv = getattr(args, "argv", None) or sys.argv[1:]
    result = reproduce_cifar10(
        args.out,
        data=args.data,
        ablation=args.ablation,
        base_config=_recipe_from_args(args, default="cifar10"),
        word_vectors=args.word_vectors,
        resume=args.resume,
        progress=not args.quiet,
        log=_log_for(args),
        command="dpq " + " ".join(shlex.quote(a) for a in argv),
        baselines=_parse_methods(args.baselines),
        split_seed=args.split_seed,
        device=args.device,
        workers=args.workers,
    )
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


# ---------------------------------------------------------------------------- evaluate


def _add_evaluate_command(sub: argparse._SubParsersAction) -> None:
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
        "--images, --split): its features, its codes, the float features and any --baselines "
        "fitted on its training features.",
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
        "lsh) or float (exhaustive search on the unquantized features)",
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
        help="also score exhaustive search on the unquantized features (a reference row)",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of every baseline (default: 0)")
    evaluate.add_argument(
        "--out", help="write all results (mAP, timings, curves) to this JSON file"
    )
    _quiet_flag(evaluate)
    evaluate.add_argument(
        "--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS
    )
    trained = evaluate.add_argument_group("a trained model instead of saved features")
    trained.add_argument("--model", metavar="CKPT_DIR", help="a DPQ checkpoint directory")
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
    _add_source_options(evaluate)
    _add_device_options(evaluate)
    evaluate.set_defaults(func=_cmd_evaluate)


def _missing_flags(args: argparse.Namespace, *names: str) -> list[str]:
    """The command-line spelling (--query-features) of each of ``names`` that was not given."""
    return ["--" + name.replace("_", "-") for name in names if getattr(args, name) is None]


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if args.model is not None or args.images is not None or args.split is not None:
        return _evaluate_model(args)
    from dpq.atomic import write_json_atomic
    from dpq.evaluate import retrieval as ev
    from dpq.evaluate.report import format_map_table

    missing = _missing_flags(args, "query_features", "query_labels", "db_labels")
    if missing:
        raise ValueError(
            f"missing {', '.join(missing)}: give saved features and labels, or a trained model "
            "with --model CKPT_DIR --images SOURCE --split FILE."
        )
    if _image_flags_given(args):
        raise ValueError(
            f"{', '.join(_image_flags_given(args))} apply to --images (a trained model's "
            "source), not to saved features."
        )
    if args.out:
        from dpq.atomic import check_writable_file

        check_writable_file(args.out, "--out")
    names = _parse_methods(args.method) + _parse_methods(args.baselines)
    index = None
    if args.index is not None:
        from dpq.index import DPQIndex

        index = DPQIndex.load(args.index)
    metric = args.metric or ("ip" if index is not None and index.search_mode == "ip" else "l2")
    features = ev.FeatureSet.from_files(
        query_features=args.query_features,
        query_labels=args.query_labels,
        db_features=args.db_features,
        db_labels=args.db_labels,
        train_features=args.train_features,
        train_labels=args.train_labels,
        metric=metric,
    )
    bits = _parse_bits(args.bits)
    methods: list[Any] = []
    if "dpq" in names:
        if index is None:
            raise ValueError("method 'dpq' needs a DPQ index: pass --index PATH (`dpq encode`).")
        methods += ev.dpq_methods(index, bits, len(features.db_labels), features.dim)
    baselines = [name for name in names if name not in ("dpq", "float")]
    methods += ev.baseline_methods(baselines, bits, features, seed=args.seed)
    if args.float_reference or "float" in names:
        methods.append(ev.float_method(features))
    evaluation = ev.evaluate_methods(features, methods, r=args.r, progress=not args.quiet)
    for note in evaluation.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"mAP@{evaluation.r} over {evaluation.n_queries} queries, {evaluation.n_database} items")
    print(format_map_table(evaluation.map_table()))
    if evaluation.float_reference() is not None:
        print(f"float features (no quantization): {evaluation.float_reference():.3f}")
    if args.out:
        print(f"wrote {write_json_atomic(args.out, evaluation.to_dict())}")
    return 0


def _evaluate_model(args: argparse.Namespace) -> int:
    """`dpq evaluate --model --images --split`: features, codes, float search, baselines."""
    from dpq.atomic import write_json_atomic
    from dpq.data import Split
    from dpq.evaluate.report import format_map_table, format_results_table
    from dpq.training.experiments import evaluate_split

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
    if args.out:
        from dpq.atomic import check_writable_file

        check_writable_file(args.out, "--out")
    baselines = _parse_methods(args.baselines)
    model = _load_model(args, args.model)
    split = Split.load(args.split)
    source = _load_source(args, args.images)
    if args.bits != "8,16,24,32":
        print(
            "note: with --model every prefix of the model's codes is scored "
            f"({model.config.quantizer.num_levels} levels of "
            f"{model.config.quantizer.bits_per_level} bits); --bits is ignored.",
            file=sys.stderr,
        )
    evaluation = evaluate_split(
        model,
        source,
        split,
        baselines=baselines,
        r=args.r,
        curves=True,
        progress=not args.quiet,
        workers=args.workers,
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


# ---------------------------------------------------------------------------- encode, search


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
        help="needs --model: any source `dpq train` accepts; labels come from it unless "
        "--labels is given",
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
        help="with --images, a split from `dpq data split`: encode only its --subset rows (ids "
        "stay the row numbers in the source)",
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
        help="with --codebooks: the hard assignment rule (default: euclidean; with --model the "
        "model's rule is used)",
    )
    encode.add_argument(
        "--search-mode",
        choices=["aqd", "ip"],
        default=None,
        help="how the index is searched unless `dpq search --mode` says otherwise (default: "
        "the model's, ip for class-posterior features; aqd with --codebooks)",
    )
    _add_source_options(encode)
    _add_device_options(encode)
    encode.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    encode.add_argument(
        "--partition-levels",
        type=int,
        choices=[0, 1, 2],
        default=0,
        help="group the items by their first 1 or 2 codes (K or K^2 cells), so that `dpq "
        "search --nprobe N` scans only the N nearest cells (default 0: one cell; see "
        "docs/scaling.md)",
    )
    encode.add_argument("--out", required=True, help="the index file to write (.npz)")
    encode.add_argument(
        "--append",
        action="store_true",
        help="add the items to the existing index file --out (same model; its codebooks are "
        "checked) instead of writing a new one",
    )
    _quiet_flag(encode)
    _add_ray_options(encode)
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
    _add_source_options(search)
    _add_device_options(search)
    search.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    search.add_argument(
        "--k",
        type=int,
        default=10,
        help="results per query (default 10; at most the index size is returned)",
    )
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
        "--nprobe",
        type=int,
        default=None,
        metavar="N",
        help="a partitioned index (`dpq encode --partition-levels`): scan only the N cells "
        "nearest to each query (default: every item)",
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
    _quiet_flag(search, "progress or summary")
    search.set_defaults(func=_cmd_search)


def _items(args: argparse.Namespace, subset: str):  # -> (inputs, labels | None, ids | None, source)
    """The rows to encode or search: --features as given, or --images read (and --split)."""
    import numpy as np

    if args.features is not None:
        if _image_flags_given(args):
            raise ValueError(
                f"{', '.join(_image_flags_given(args))} apply to --images, not to --features."
            )
        return _read_array(args.features, "--features"), None, None, None
    if args.model is None:
        raise ValueError("--images needs --model: the checkpoint that turns images into features.")
    source = _load_source(args, args.images)
    if source.kind == "features":
        raise ValueError("--images takes an image source; give saved features with --features.")
    if args.split is None:
        return source.inputs, source.labels, None, source
    from dpq.data import Split

    rows = Split.load(args.split).rows(subset, len(source), args.images)
    inputs, labels = source.rows(rows)
    return inputs, labels, np.asarray(rows, np.int64), source


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    """`dpq encode --engine ray`: the flags of dpq.encode.ray (issue 16)."""
    group = parser.add_argument_group("encoding on a Ray cluster (pip install 'dpq[distributed]')")
    group.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process (default); ray: shards encoded by Ray Data actors, one model "
        "each, then merged into --out (re-running encodes only missing shards)",
    )
    group.add_argument(
        "--address",
        help="a running Ray cluster (`ray start --head` prints it; 'auto': the local one); "
        "default: start a local cluster for this command",
    )
    group.add_argument("--shards", type=int, help="code shards (default 8)")
    group.add_argument("--actors", type=int, help="encoder actors (default: one per CPU)")
    group.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor")
    group.add_argument("--shard-dir", help="folder of the plan and the shards (default OUT.shards)")


def _cmd_encode_ray(args: argparse.Namespace) -> int:
    from dpq.encode.ray import SourceSpec, encode_on_ray

    if args.model is None:
        raise ValueError("--engine ray needs --model (a checkpoint every node can read).")
    if args.append:
        raise ValueError(
            "--append applies to --engine local; with --engine ray, encode into a new file "
            "and join the two with `dpq index merge OLD NEW --out MERGED`."
        )
    inputs = {"features": args.features} if args.features else {"images": args.images}
    source = SourceSpec(
        **inputs,
        image_root=args.image_root,
        image_size=args.image_size,
        strip_prefix=args.strip_prefix,
        skip_corrupt=args.skip_corrupt,
    )
    rows = None
    if args.split is not None:
        from dpq.data import Split

        rows = getattr(Split.load(args.split), args.subset)  # checked against the source
    result = encode_on_ray(
        args.model,
        source,
        args.out,
        shards=8 if args.shards is None else args.shards,
        rows=rows,
        ids=None if args.ids is None else _read_array(args.ids, "--ids"),
        labels=None if args.labels is None else _read_array(args.labels, "--labels"),
        address=args.address,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        shard_dir=args.shard_dir,
        batch_size=args.batch_size,
        metadata={"model": str(args.model)},
        search_mode=args.search_mode,
        partition_levels=args.partition_levels,
        progress=not args.quiet,
    )
    print(result.summary())
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from dpq.atomic import check_writable_file
    from dpq.index import DPQIndex

    if args.engine == "ray":
        return _cmd_encode_ray(args)
    ray_flags = ("address", "shards", "actors", "shard_dir")
    if any(getattr(args, name) is not None for name in ray_flags) or args.gpus_per_actor:
        raise ValueError(
            "--address, --shards, --actors, --gpus-per-actor and --shard-dir apply to --engine ray."
        )
    check_writable_file(args.out, "--out")
    existing = None
    if args.append:
        existing = DPQIndex.load(args.out, mmap=True)  # FileNotFoundError names it
        if args.search_mode is not None or args.partition_levels:
            raise ValueError(
                "--search-mode and --partition-levels are the existing index's with --append."
            )
    inputs, labels, ids, source = _items(args, args.subset)
    if args.labels is not None:
        from dpq.data.features import read_labels

        labels = read_labels(args.labels, "--labels")
    if args.ids is not None:
        ids = _read_array(args.ids, "--ids")
    metadata: dict[str, object] = {
        "created_by": "dpq encode",
        "source": str(args.images or args.features),
    }
    if source is not None and args.labels is None:
        metadata["classes"] = source.classes
    began = time.perf_counter()
    if args.model is not None:
        from dpq.encode.build import build_index

        if args.assignment is not None:
            raise ValueError("--assignment applies to --codebooks; a model encodes with its rule.")
        model = _load_model(args, args.model)
        metadata["model"] = str(args.model)
        if existing is not None:
            existing.check_compatible(model.codebooks(), source=f"model {args.model}")
        index = build_index(
            model,
            inputs,
            ids=ids,
            labels=labels,
            batch_size=args.batch_size,
            metadata=metadata,
            progress=not args.quiet,
            search_mode=args.search_mode,
            workers=args.workers,
            partition_levels=args.partition_levels,
        )
    else:
        metadata["codebooks"] = str(args.codebooks)
        features = np.asarray(inputs)
        codebooks = _read_array(args.codebooks, "--codebooks")
        if existing is not None:
            existing.check_compatible(codebooks, source=f"--codebooks {args.codebooks}")
        index = DPQIndex(
            codebooks,
            assignment=(args.assignment or "euclidean")
            if existing is None
            else existing.assignment,
            metadata=metadata,
            search_mode=args.search_mode or "aqd",
            partition_levels=args.partition_levels,
        )
        for name, values in (("--labels", labels), ("--ids", ids)):
            if values is not None and len(values) != len(features):
                raise ValueError(
                    f"{name} has {len(values)} rows but there are {len(features)} items; give "
                    "one per item, in the same order."
                )
        index.add_features(features, ids=ids, labels=labels)
    seconds = time.perf_counter() - began
    if existing is not None:
        from dpq.index import append_to_index_file

        added = append_to_index_file(
            args.out, index.codes, ids=ids if ids is not None else None, labels=index.labels
        )
        print(
            f"appended {len(added):,} items to {args.out} (ids {int(added.min())}.."
            f"{int(added.max())}): {existing.ntotal + len(added):,} items now; encoded in "
            f"{seconds:.1f} s ({len(added) / max(seconds, 1e-9):,.0f} items/s)"
        )
        return 0
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
    from dpq.evaluate.report import format_search_results
    from dpq.index import DPQIndex

    if args.out is not None:
        from dpq.atomic import check_writable_file

        check_writable_file(args.out, "--out")
    index = DPQIndex.load(args.index)
    queries, _, query_ids, _ = _items(args, args.subset)
    if args.model is not None:
        model = _load_model(args, args.model)
        index.check_compatible(model.codebooks(), source=f"model {args.model}")
        began = time.perf_counter()
        queries = model.extract_features(
            queries, batch_size=args.batch_size, progress=not args.quiet, workers=args.workers
        )
        seconds = time.perf_counter() - began
        _say(args, f"features of {len(queries):,} queries in {seconds:.1f} s")
    distances, ids = index.search(
        queries,
        args.k,
        num_levels=args.num_levels,
        mode=args.mode,
        rerank_from=args.rerank_from,
        rerank_candidates=args.rerank_candidates,
        nprobe=args.nprobe,
    )
    text = format_search_results(index, distances, ids, args.format, query_ids=query_ids)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    from dpq.atomic import write_text_atomic

    write_text_atomic(args.out, text)
    _say(args, f"wrote top-{args.k} of {len(ids):,} queries to {args.out}")
    return 0


# ---------------------------------------------------------------------------- serve


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
    serve.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help="where the model runs: auto (a CUDA GPU where there is one, else the CPU), cpu, "
        "cuda, cuda:N or mps",
    )
    serve.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from dpq.serve import ServeSettings, serve

    settings = ServeSettings(
        index=args.index,
        model=args.model,
        images=args.images,
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
        device=args.device,
    )
    serve(settings)
    return 0


# ---------------------------------------------------------------------------- main


def _add_index_file_commands(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser("index", help="inspect and merge index files")
    index_sub = index.add_subparsers(dest="index_command", required=True, metavar="COMMAND")
    info = index_sub.add_parser(
        "info", help="what an index file holds: items, code lengths, bytes per item, cells"
    )
    info.add_argument("index", help="an index file written by `dpq encode`")
    info.set_defaults(func=_cmd_index_info)
    merge = index_sub.add_parser(
        "merge",
        help="merge index files encoded separately with the same model into one",
        description="Merge index files encoded with the same codebooks (checked) into one file, "
        "written atomically: the items of the first file, then the second's, ... (in every "
        "cell). Ids must be disjoint, or pass --renumber-ids to shift each file's ids by the "
        "items of the files before it (slices encoded with default ids 0..n-1).",
    )
    merge.add_argument("inputs", nargs="+", metavar="INDEX", help="index files to merge")
    merge.add_argument("--out", required=True, help="the merged index file (.npz)")
    merge.add_argument(
        "--renumber-ids", action="store_true", help="shift each file's ids after the earlier ones"
    )
    merge.set_defaults(func=_cmd_index_merge)


def _cmd_index_info(args: argparse.Namespace) -> int:
    import numpy as np

    from dpq.index import DPQIndex

    index = DPQIndex.load(args.index, mmap=True)
    bits = int(round(np.log2(index.codebook_size))) if index.codebook_size > 1 else 0
    lengths = ", ".join(str(level * bits) for level in range(1, index.num_levels + 1))
    print(
        f"{args.index}: {index.ntotal:,} items; {index.num_levels} levels x "
        f"{index.codebook_size} codewords, dim {index.dim}: codes of {lengths} bits; "
        f"{index.bytes_per_item()} bytes per item (+ 8 of id); search {index.search_mode}, "
        f"assignment {index.assignment}; partition levels {index.partition_levels}; labels "
        f"{'yes' if index.labels is not None else 'no'}; codebooks {index.codebook_sha256[:12]}"
    )
    return 0


def _cmd_index_merge(args: argparse.Namespace) -> int:
    from dpq.atomic import check_writable_file
    from dpq.index import DPQIndex, merge_index_files

    check_writable_file(args.out, "--out")
    path = merge_index_files(args.inputs, args.out, renumber_ids=args.renumber_ids)
    print(
        f"wrote {path}: {DPQIndex.load(path, mmap=True).ntotal:,} items from {len(args.inputs)} files"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from dpq import __version__

    parser = argparse.ArgumentParser(
        prog="dpq",
        description=(
            "Deep Progressive Quantization for image retrieval: train one model that gives "
            "8/16/24/32-bit codes, encode a database, search it with lookup tables, evaluate."
        ),
    )
    parser.add_argument("--version", action="version", version=f"dpq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data_commands(sub)
    _add_evaluate_command(sub)
    _add_model_commands(sub)
    _add_index_commands(sub)
    _add_index_file_commands(sub)
    _add_serve_command(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, ``dpq: warning: ...`` (not Python's file:line form)."""
    print(f"dpq: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 success, 2 user error, 3 diverged,
    130 interrupted)."""
    from dpq.encode.ray import ShardEncodingError
    from dpq.training.checkpoints import RunInProgressError
    from dpq.training.loop import TrainingDiverged

    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("RANK", "0") != "0" and hasattr(args, "quiet"):
        args.quiet = True  # torchrun: progress and messages from rank 0 only (errors from all)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return int(args.func(args) or 0)
    except TrainingDiverged as exc:
        print(f"dpq: error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except (ValueError, FileNotFoundError, RunInProgressError, ShardEncodingError) as exc:
        print(f"dpq: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as exc:
        name = f" {exc.filename}" if exc.filename else ""
        print(f"dpq: error: cannot write or read{name}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dpq: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`dpq ... | head`): stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
