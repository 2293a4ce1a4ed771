"""``dpq search``: the top k of an index for query features or images, as JSON or CSV."""

from __future__ import annotations

import argparse
import sys
import time

from dpq.cli.encode import items
from dpq.cli.options import (
    add_command,
    add_device_options,
    add_engine_options,
    add_quiet_option,
    add_source_options,
    check_out,
    hidden_alias,
    load_model,
    say,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "search",
        help="the top k of an index for query features or images",
        description="Rank the index items for each query by Asymmetric Quantization Distance "
        "(lookup tables over the first --num-levels codes; a binary index of a hashing method: "
        "by Hamming distance, through the model's method with --model, else by the signs of "
        "float query features) and print the top k ids, distances and, when the index has "
        "them, labels.",
    )
    parser.add_argument("--index", required=True, help="an index file written by `dpq encode`")
    queries = parser.add_mutually_exclusive_group(required=True)
    queries.add_argument(
        "--features",
        metavar="NPY",
        help="float .npy queries: semantic features (nq, D) (a binary index: (nq, bits), their "
        "signs are the bits, or uint8 packed codes), or model inputs with --model",
    )
    queries.add_argument(
        "--images", metavar="SOURCE", help="query images (needs --model); any `dpq encode` source"
    )
    parser.add_argument(
        "--model",
        metavar="CKPT_DIR",
        help="the checkpoint that built the index (checked against the index's codebooks)",
    )
    parser.add_argument(
        "--split", metavar="FILE", help="with --images: search only the --subset rows"
    )
    parser.add_argument(
        "--subset",
        choices=["database", "query", "train"],
        default="query",
        help="which part of --split to search with",
    )
    add_source_options(parser)
    add_device_options(parser)
    add_engine_options(parser)
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    ranking = parser.add_argument_group("ranking")
    ranking.add_argument(
        "--k", type=int, default=10, help="results per query (at most the index size is returned)"
    )
    ranking.add_argument(
        "--num-levels",
        type=int,
        default=None,
        metavar="L",
        help="search with the first L codes only (L * log2 K bits; default: all)",
    )
    ranking.add_argument(
        "--search-mode",
        choices=["aqd", "ip"],
        default=None,
        help="aqd: squared distance to the reconstruction (Eq. 30); ip: inner product, "
        "reported as its negative (default: the index's search mode, set by `dpq encode "
        "--search-mode`)",
    )
    hidden_alias(
        parser, "--mode", "--search-mode", choices=["aqd", "ip"]
    )  # its name before, for one release
    ranking.add_argument(
        "--nprobe",
        type=int,
        default=None,
        metavar="N",
        help="a partitioned index (`dpq encode --partition-levels`): scan only the N cells "
        "nearest to each query (default: every item)",
    )
    ranking.add_argument(
        "--rerank-from",
        type=int,
        default=None,
        metavar="L0",
        help="shortlist with the first L0 codes, then re-rank the shortlist with all",
    )
    ranking.add_argument(
        "--rerank-candidates",
        type=int,
        default=None,
        help="shortlist size for --rerank-from (default: max(10 k, 100))",
    )
    parser.add_argument(
        "--format",
        choices=["json", "csv"],
        default="json",
        help="json: one object per query with ids, distances (and labels); csv: one row per "
        "result, query,rank,id,distance[,label]",
    )
    parser.add_argument("--out", help="write the results to this file instead of stdout")
    add_quiet_option(parser, "progress or summary")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dpq.evaluate.report import format_search_results
    from dpq.index import DPQIndex
    from dpq.index.kinds import check_compatible, load_any, search_features
    from dpq.inference.names import check_engine

    check_out(args)
    check_engine(args.engine, args.onnx)
    if args.model is None and (args.engine != "torch" or args.onnx is not None):
        raise ValueError("--engine and --onnx run a model: add --model (the index's checkpoint).")
    index = load_any(args.index)
    queries, _, query_ids, _ = items(args, args.subset)
    options = {
        "num_levels": args.num_levels,
        "mode": args.search_mode,
        "rerank_from": args.rerank_from,
        "rerank_candidates": args.rerank_candidates,
        "nprobe": args.nprobe,
    }
    method = None
    if args.model is not None:
        from dpq.inference.engines import engine_for
        from dpq.methods import method_for

        model = load_model(args, args.model)
        method = method_for(model.config)
        check_compatible(index, method.new_index(model), source=f"model {args.model}")
        began = time.perf_counter()
        engine = engine_for(
            model,
            args.model,
            args.engine,
            args.onnx,
            queries,
            batch_size=args.batch_size,
            precision=args.engine_precision,
        )
        queries = engine.features(queries, workers=args.workers, progress=not args.quiet)
        engine.close()
        seconds = time.perf_counter() - began
        say(args, f"features of {len(queries):,} queries in {seconds:.1f} s ({engine.name})")
    if isinstance(index, DPQIndex) and args.nprobe is not None and index.partition_levels == 0:
        raise ValueError(
            f"--nprobe needs a partitioned index, but {args.index} scans every item (it was "
            "encoded without --partition-levels); re-encode it with `dpq encode "
            "--partition-levels 1` (or 2), or leave --nprobe out."
        )
    distances, ids = search_features(index, queries, args.k, method=method, **options)
    text = format_search_results(index, distances, ids, args.format, query_ids=query_ids)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    from dpq.atomic import write_text_atomic

    write_text_atomic(args.out, text)
    say(args, f"wrote top-{args.k} of {len(ids):,} queries to {args.out}")
    return 0
