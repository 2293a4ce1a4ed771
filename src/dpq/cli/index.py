"""``dpq index info`` and ``dpq index merge``: what an index file holds; files joined."""

from __future__ import annotations

import argparse

from dpq.cli.options import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    index = add_command(
        subparsers,
        "index",
        help="inspect and merge index files",
        description="Inspect an index file written by `dpq encode` (`dpq index info`) or "
        "merge files encoded separately with the same model (`dpq index merge`).",
    )
    commands = index.add_subparsers(dest="index_command", required=True, metavar="COMMAND")
    info = add_command(
        commands,
        "info",
        help="what an index file holds: items, code lengths, cells",
        description="Print an index file's size, code lengths, bytes per item, search mode, "
        "assignment rule, partition levels and the start of its codebooks' checksum (a "
        "binary index: its size, code length and bytes per item).",
    )
    info.add_argument("index", help="an index file written by `dpq encode`")
    merge = add_command(
        commands,
        "merge",
        help="merge index files of the same model into one",
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
    index.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return {"info": _info, "merge": _merge}[args.index_command](args)


def _info(args: argparse.Namespace) -> int:
    import numpy as np

    from dpq.index.kinds import kind_of, load_any

    index = load_any(args.index, mmap=True)
    labelled = "yes" if index.labels is not None else "no"
    if kind_of(index) == "binary":
        print(
            f"{args.index}: {index.ntotal:,} items; binary codes of {index.bits} bits; "
            f"{index.code_bytes} bytes per item (+ 8 of id); search Hamming; labels {labelled}"
        )
        return 0
    bits = int(round(np.log2(index.codebook_size))) if index.codebook_size > 1 else 0
    lengths = ", ".join(str(level * bits) for level in range(1, index.num_levels + 1))
    print(
        f"{args.index}: {index.ntotal:,} items; {index.num_levels} levels x "
        f"{index.codebook_size} codewords, dim {index.dim}: codes of {lengths} bits; "
        f"{index.bytes_per_item()} bytes per item (+ 8 of id); search {index.search_mode}, "
        f"assignment {index.assignment}; partition levels {index.partition_levels}; labels "
        f"{labelled}; codebooks {index.codebook_sha256[:12]}"
    )
    return 0


def _merge(args: argparse.Namespace) -> int:
    from dpq.atomic import check_writable_file
    from dpq.index import DPQIndex, merge_index_files
    from dpq.index.kinds import index_kind

    check_writable_file(args.out, "--out")
    binary = [path for path in args.inputs if index_kind(path) != "dpq"]
    if binary:
        raise ValueError(
            f"{binary[0]} holds binary codes; `dpq index merge` merges DPQ index files. Encode "
            "the items into one binary index instead (`dpq encode --append`)."
        )
    path = merge_index_files(args.inputs, args.out, renumber_ids=args.renumber_ids)
    print(
        f"wrote {path}: {DPQIndex.load(path, mmap=True).ntotal:,} items from {len(args.inputs)} files"
    )
    return 0
