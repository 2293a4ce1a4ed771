"""``dpq serve``: an index over HTTP (FastAPI + uvicorn; the ``serve`` extra)."""

from __future__ import annotations

import argparse

from dpq.cli.options import add_command, add_device_options, add_engine_options


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "serve",
        help="serve an index over HTTP: API, metrics, search page",
        description="Search an index over HTTP (FastAPI + uvicorn; the `serve` extra): POST "
        "/search by image (with --model), vector or id at any code length, add and delete "
        "items (journalled, durable before the answer; closed unless --api-key or "
        "--allow-open-writes), a web page at /, API docs at /docs, Prometheus metrics at "
        "/metrics.",
    )
    parser.add_argument("--index", required=True, help="an index file written by `dpq encode`")
    parser.add_argument("--model", metavar="CKPT_DIR", help="its model: accept image queries")
    parser.add_argument(
        "--images",
        metavar="SOURCE",
        help="the source the index was encoded from (its ids are row numbers): thumbnails",
    )
    parser.add_argument("--image-root", help="list files: the folder or zip holding the images")
    parser.add_argument("--image-size", type=int, metavar="N", help="the model's input size N x N")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    parser.add_argument(
        "--api-key",
        help="key required for writes (default: the DPQ_API_KEY environment variable; "
        "neither: writes are closed unless --allow-open-writes)",
    )
    parser.add_argument(
        "--allow-open-writes",
        action="store_true",
        help="without a key, let anyone who can reach the service add and delete items "
        "(writes from other sites' pages are refused either way)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let pages of this origin (https://app.example) call the API; repeatable",
    )
    parser.add_argument(
        "--force-journal",
        action="store_true",
        help="replay the index's journal even when it continues another state of the index",
    )
    parser.add_argument(
        "--max-upload-mb", type=float, default=10.0, help="request body limit in MB"
    )
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=0.0,
        metavar="R",
        help="requests per second per client address (0: unlimited)",
    )
    parser.add_argument("--rate-burst", type=int, help="burst size of --rate-limit (default 2 R)")
    parser.add_argument("--threads", type=int, help="search threads (default: CPU count)")
    parser.add_argument(
        "--model-threads",
        type=int,
        help="threads of the model's forward pass (default: torch's, or the engine's)",
    )
    parser.add_argument(
        "--max-pending", type=int, default=256, help="requests waiting beyond this get 503"
    )
    parser.add_argument(
        "--batch-max",
        type=int,
        metavar="N",
        help="single searches that arrive together are searched in one index call, N at "
        "most (1: no micro-batching; default 64)",
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        metavar="MS",
        help="with --batch-concurrency above 1: how long a search may wait for others while "
        "one is running (an idle service searches at once; default 2)",
    )
    parser.add_argument(
        "--batch-concurrency",
        type=int,
        metavar="N",
        help="batched index searches running at once (default 1: one scan uses every core, "
        "and what arrives meanwhile is searched together next)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")
    add_device_options(parser)
    add_engine_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dpq.serve import ServeSettings, serve

    given = {
        "batch_max": args.batch_max,
        "batch_wait_ms": args.batch_wait_ms,
        "batch_concurrency": args.batch_concurrency,
    }
    batching = {name: value for name, value in given.items() if value is not None}
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
        allow_open_writes=args.allow_open_writes,
        cors_origins=tuple(args.cors_origin),
        force_journal=args.force_journal,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        threads=args.threads,
        model_threads=args.model_threads,
        max_pending=args.max_pending,
        device=args.device,
        engine=args.engine,
        onnx=args.onnx,
        engine_precision=args.engine_precision,
        **batching,
    )
    serve(settings)
    return 0
