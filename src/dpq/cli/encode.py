"""``dpq encode``: a database into one index file, here or on a Ray cluster.

The workflow below (``run``, ``_run_on_ray``, ``items``) is the command's as it was in
cli.py; it moves into the library (dpq.encode) in its own change.
"""

from __future__ import annotations

import argparse
import sys

from dpq.cli.options import (
    add_command,
    add_device_options,
    add_engine_options,
    add_quiet_option,
    add_source_options,
    image_flags_given,
    read_source,
    source_spec,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "encode",
        help="encode a database into an index file (codes + codebooks)",
        description="Encode items with a model's codebooks (greedy residual hard assignment, "
        "the model's rule; a model of another method: its own codes, e.g. the sign bits of a "
        "hashing method in a binary index) and write one index file (.npz, no pickle, with a "
        "checksum) that `dpq search`, `dpq evaluate --index` and dpq.index.load_any read.",
    )
    books = parser.add_mutually_exclusive_group(required=True)
    books.add_argument(
        "--model", metavar="CKPT_DIR", help="a checkpoint directory (DPQ or another method)"
    )
    books.add_argument(
        "--codebooks",
        metavar="NPY",
        help="instead of --model: float32 (L, K, D) codebooks; then --features are the "
        "semantic features (N, D) to encode",
    )
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument(
        "--images",
        metavar="SOURCE",
        help="needs --model: any source `dpq train` accepts; labels come from it unless "
        "--labels is given",
    )
    inputs.add_argument(
        "--features",
        metavar="NPY",
        help="float (N, F) .npy: model inputs with --model (e.g. backbone features for an "
        "'identity' backbone), semantic features (N, D) with --codebooks",
    )
    parser.add_argument("--labels", metavar="NPY", help="int (N,) or multi-hot (N, C) labels")
    parser.add_argument("--ids", metavar="NPY", help="int64 (N,) item ids (default: row numbers)")
    parser.add_argument(
        "--split",
        metavar="FILE",
        help="with --images, a split from `dpq data split`: encode only its --subset rows (ids "
        "stay the row numbers in the source)",
    )
    parser.add_argument(
        "--subset",
        choices=["database", "query", "train"],
        default="database",
        help="which part of --split to encode",
    )
    parser.add_argument(
        "--assignment",
        choices=["euclidean", "cosine"],
        default=None,
        help="with --codebooks: the hard assignment rule (default: euclidean; with --model the "
        "model's rule is used)",
    )
    parser.add_argument(
        "--search-mode",
        choices=["aqd", "ip"],
        default=None,
        help="how the index is searched unless `dpq search --search-mode` says otherwise "
        "(default: the model's, ip for class-posterior features; aqd with --codebooks)",
    )
    add_source_options(parser)
    add_device_options(parser)
    add_engine_options(parser, also=RUNNERS)
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument(
        "--partition-levels",
        type=int,
        choices=[0, 1, 2],
        default=0,
        help="group the items by their first 1 or 2 codes (K or K^2 cells), so that `dpq "
        "search --nprobe N` scans only the N nearest cells (0: one cell; see "
        "docs/scaling.md)",
    )
    parser.add_argument("--out", required=True, help="the index file to write (.npz)")
    parser.add_argument(
        "--append",
        action="store_true",
        help="add the items to the existing index file --out (same model; its codebooks are "
        "checked) instead of writing a new one",
    )
    add_quiet_option(parser)
    _add_ray_options(parser)
    parser.set_defaults(run=run)


RUNNERS = ("local", "ray")
"""Where the items are encoded (``--runner``; before issue 25 spelt ``--engine``)."""


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    """`dpq encode --runner ray`: the flags of dpq.encode.ray (issue 16)."""
    group = parser.add_argument_group("encoding on a Ray cluster (pip install 'dpq[distributed]')")
    group.add_argument(
        "--runner",
        choices=list(RUNNERS),
        default=None,
        help="local: this process (the default); ray: shards encoded by Ray Data actors, one "
        "model each, then merged into --out (re-running encodes only missing shards)",
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


def _read_array(path: str, what: str):  # -> np.ndarray
    from dpq.data import read_array

    return read_array(path, what)


def items(args: argparse.Namespace, subset: str):  # -> (inputs, labels | None, ids | None, source)
    """The rows to encode or search: --features as given, or --images read (and --split)."""
    import numpy as np

    if args.features is not None:
        if image_flags_given(args):
            raise ValueError(
                f"{', '.join(image_flags_given(args))} apply to --images, not to --features."
            )
        return _read_array(args.features, "--features"), None, None, None
    if args.model is None:
        raise ValueError("--images needs --model: the checkpoint that turns images into features.")
    source = read_source(args, args.images)
    if source.kind == "features":
        raise ValueError("--images takes an image source; give saved features with --features.")
    if args.split is None:
        return source.inputs, source.labels, None, source
    from dpq.data import Split

    rows = Split.load(args.split).rows(subset, len(source), args.images)
    inputs, labels = source.rows(rows)
    return inputs, labels, np.asarray(rows, np.int64), source


def runner_and_engine(args: argparse.Namespace) -> tuple[str, str]:
    """(runner, engine) from ``--runner`` and ``--engine``; ``--engine local|ray``, the
    runner's old spelling, still works with a deprecation line on stderr."""
    engine, runner = args.engine, args.runner
    if engine in RUNNERS:
        print(
            f"dpq encode: --engine {engine} is deprecated, use --runner {engine} (--engine now "
            "names the inference engine: torch, onnxruntime or openvino)",
            file=sys.stderr,
        )
        if runner is not None and runner != engine:
            raise ValueError(
                f"--engine {engine} (the old spelling of --runner) contradicts --runner "
                f"{runner}; give --runner only."
            )
        engine, runner = "torch", engine
    return runner or "local", engine


def run(args: argparse.Namespace) -> int:
    from dpq.data import Split
    from dpq.encode.job import EncodeSettings, encode_collection
    from dpq.index import DPQIndex
    from dpq.index.usage import code_usage

    runner_name, engine = runner_and_engine(args)
    runner = None
    if runner_name == "ray":
        from dpq.encode.ray import RayRunner

        runner = RayRunner(
            address=args.address, actors=args.actors, gpus_per_actor=args.gpus_per_actor
        )
    elif args.address is not None or args.actors is not None or args.gpus_per_actor:
        raise ValueError("--address, --actors and --gpus-per-actor apply to --runner ray.")
    settings = EncodeSettings(
        args.out,
        source_spec(args),
        model=args.model,
        codebooks=args.codebooks,
        assignment=args.assignment,
        rows=None if args.split is None else getattr(Split.load(args.split), args.subset),
        ids=args.ids,
        labels=args.labels,
        append=args.append,
        batch_size=args.batch_size,
        device=args.device,
        engine=engine,
        onnx=args.onnx,
        engine_precision=args.engine_precision,
        workers=args.workers,
        search_mode=args.search_mode,
        partition_levels=args.partition_levels,
        runner=runner,
        shards=args.shards,
        shard_dir=args.shard_dir,
        progress=not args.quiet,
    )
    result = encode_collection(settings)
    print(result.summary())
    if result.stages is not None and not args.quiet:
        print(f"dpq encode: {result.stages.summary()}", file=sys.stderr)
    if isinstance(result.index, DPQIndex):  # binary codes have no codewords to count
        for line in code_usage(result.index.codes, result.index.codebook_size).report_lines():
            print(f"dpq encode: {line}", file=sys.stderr)
    return 0
