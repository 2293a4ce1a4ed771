"""The ``dpq`` command line: one module per command, each with ``register(subparsers)``
(its flags) and ``run(args) -> int`` (parse, call the library, print); flags that several
commands share are in :mod:`dpq.cli.options` and :mod:`dpq.cli.recipe`.

Tests call ``main([...])`` directly. A mistake a user can fix (a missing or unreadable file,
a bad value, conflicting flags) prints one line ``dpq: error: ...`` to stderr and returns
exit code 2; a training that diverged returns 3; Ctrl-C returns 130 without a traceback; a
closed pipe (``dpq ... | head``) ends quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from dpq.cli import data, demo, encode, evaluate, export, index, reproduce, search, serve, train
from dpq.cli.options import HelpFormatter

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
# in the order `dpq --help` lists them: the path from data to a served index, then the
# paper's experiments
COMMANDS = (data, train, encode, search, evaluate, index, export, serve, reproduce, demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``dpq`` parser with every command registered."""
    from dpq import __version__

    parser = argparse.ArgumentParser(
        prog="dpq",
        description=(
            "Deep Progressive Quantization for image retrieval: train one model that gives "
            "8/16/24/32-bit codes, encode a database, search it with lookup tables, evaluate. "
            "`dpq COMMAND --help` explains each command."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dpq {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, ``dpq: warning: ...`` (not Python's file:line form)."""
    print(f"dpq: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 success, 2 user error, 3 diverged,
    130 interrupted)."""
    from dpq.encode.shards import ShardEncodingError
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
        return int(args.run(args) or 0)
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
