"""Command-line interface: argument parsing only. Each sub-command calls the library.

Tests call ``main([...])`` directly. Errors a user can fix (``ValueError``,
``FileNotFoundError``) print one line to stderr and return exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    info = data_sub.add_parser(
        "info", help="counts per class, image size and protocol split sizes of a dataset"
    )
    info.add_argument("source", help="CIFAR-10 archive/folder/zip, an image folder or zip, or a list file")
    info.set_defaults(func=_cmd_data_info)


def _cmd_data_info(args: argparse.Namespace) -> int:
    raise NotImplementedError("dpq data info: owned by the data layer")


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
