"""``dpq encode``: a database into one index file, here or on a Ray cluster.

The workflow below (``run``, ``_run_on_ray``, ``items``) is the command's as it was in
cli.py; it moves into the library (dpq.encode) in its own change.
"""

from __future__ import annotations

import argparse
import time

from dpq.cli.options import (
    add_command,
    add_device_options,
    add_quiet_option,
    add_source_options,
    image_flags_given,
    load_model,
    read_source,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "encode",
        help="encode a database into an index file (codes + codebooks)",
        description="Encode items with a model's codebooks (greedy residual hard assignment, "
        "the model's rule) and write one index file (.npz, no pickle, with a checksum) that "
        "`dpq search`, `dpq evaluate --index` and dpq.index.DPQIndex.load read.",
    )
    books = parser.add_mutually_exclusive_group(required=True)
    books.add_argument("--model", metavar="CKPT_DIR", help="a DPQ checkpoint directory")
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


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    """`dpq encode --engine ray`: the flags of dpq.encode.ray (issue 16)."""
    group = parser.add_argument_group("encoding on a Ray cluster (pip install 'dpq[distributed]')")
    group.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process; ray: shards encoded by Ray Data actors, one model "
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


def _run_on_ray(args: argparse.Namespace) -> int:
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


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from dpq.atomic import check_writable_file
    from dpq.index import DPQIndex

    if args.engine == "ray":
        return _run_on_ray(args)
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
    inputs, labels, ids, source = items(args, args.subset)
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
        model = load_model(args, args.model)
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
