"""Option groups that several commands share, each defined once: how a command is added
(help with defaults), how an image source is read, the hardware, quiet output, the output
file, and the comma lists of methods and code lengths.

Each ``add_*`` function adds its flags to a parser; its companion turns the parsed flags
into the library's arguments (:func:`source_options`, :func:`load_model`, :func:`log_for`).
Library imports happen inside the functions, so ``dpq --help`` loads neither torch nor numpy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

SOURCE_HELP = (
    "'digits', CIFAR-10 (cifar-10-python.tar.gz, its extracted folder, or a folder/zip of "
    "<train|test>/<class>/<image>), a folder or zip of <class>/<image> (your own "
    "collection), or a DVSQ/DPQ list file (.txt, with --image-root)"
)


METHODS_PLACEHOLDER = "{methods}"
"""In a help text: the registered retrieval methods, filled in when the help is shown (so
that building the parser imports no method, and no torch)."""


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with ``(default: X)`` after each option that has a default
    (not None or off) and whose help does not already say it, and the registered methods
    in place of :data:`METHODS_PLACEHOLDER`."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text and METHODS_PLACEHOLDER in text:
            from dpq.methods import available_methods

            text = text.replace(METHODS_PLACEHOLDER, ", ".join(available_methods()))
        default = action.default
        if (
            text is None
            or text == argparse.SUPPRESS
            or "default" in text
            or not action.option_strings
            or default is None
            or default is False
            or default == argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)"

    def add_argument(self, action: argparse.Action) -> None:
        """A command list (``dpq --help``) is aligned past its longest command name, so
        each command's help starts on the name's line."""
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction) and action.choices:
            longest = max(len(name) for name in action.choices) + self._current_indent + 2
            self._action_max_length = max(self._action_max_length, longest)


def add_command(
    subparsers: argparse._SubParsersAction, name: str, help: str, description: str
) -> argparse.ArgumentParser:
    """A sub-command: ``help`` is its one line in the parent's list, ``description`` the
    paragraph of its own ``--help``; options show their defaults."""
    return subparsers.add_parser(
        name, help=help, description=description, formatter_class=HelpFormatter
    )


def hidden_alias(parser: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """``old`` keeps working for one release as a spelling of ``new`` (same destination),
    hidden from ``--help``. ``kwargs``: the type or action of ``new``."""
    dest = new.lstrip("-").replace("-", "_")
    parser.add_argument(old, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


# ---------------------------------------------------------------------------- image source


def add_source_options(
    parser: argparse.ArgumentParser, cache: bool = False, workers: bool = True
) -> None:
    """How an image source is read: the same flags wherever a source is read.

    ``cache``: add ``--cache-dir`` (CIFAR-10's decoded arrays); ``workers``: add
    ``--workers`` (commands that decode images while a model reads them)."""
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
        "them on demand, memory bounded whatever the collection's size (stream); auto: "
        "memory when the decoded images fit a quarter of RAM",
    )
    if cache:
        group.add_argument(
            "--cache-dir",
            help="where decoded CIFAR-10 arrays are cached (default: $DPQ_CACHE_DIR or "
            "~/.cache/dpq)",
        )
    if workers:
        add_workers_option(group)


def add_workers_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--workers``: the processes that decode images read on demand."""
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes decoding images read on demand (default: one per core, up to 8; "
        "0: the main process)",
    )


def source_options(args: argparse.Namespace) -> dict[str, Any]:
    """The source flags as keyword arguments of :func:`dpq.data.load_source`."""
    from dpq.data.sources import loading_mode

    return {
        "image_root": args.image_root,
        "image_size": args.image_size,
        "strip_prefix": args.strip_prefix,
        "skip_corrupt": args.skip_corrupt,
        "cache_dir": getattr(args, "cache_dir", None),
        "in_memory": loading_mode(args.loading),
    }


def source_spec(args: argparse.Namespace, images: str | None = None):  # -> SourceSpec
    """--images (or ``images``, a command's positional source) or --features (where the
    command has them) with the source flags."""
    from dpq.data import SourceSpec

    return SourceSpec(
        images=images if images is not None else getattr(args, "images", None),
        features=getattr(args, "features", None),
        image_root=args.image_root,
        image_size=args.image_size,
        strip_prefix=args.strip_prefix,
        skip_corrupt=args.skip_corrupt,
        cache_dir=getattr(args, "cache_dir", None),
        loading=args.loading,
    )


def read_source(args: argparse.Namespace, spec: Any = None, **extra: Any):  # -> Source
    """:func:`dpq.data.load_source` of ``spec`` with the source flags (``extra`` on top)."""
    from dpq.data import load_source as load

    return load(spec, **{**source_options(args), **extra}, progress=not args.quiet)


def image_flags_given(args: argparse.Namespace) -> list[str]:
    """The image-source flags that were given (for commands that also take saved features,
    where they do not apply)."""
    names = ("image_root", "strip_prefix", "image_size", "split")
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is not None]
    return given + (["--skip-corrupt"] if getattr(args, "skip_corrupt", False) else [])


def missing_flags(args: argparse.Namespace, *names: str) -> list[str]:
    """The command-line spelling (--query-features) of each of ``names`` that was not given."""
    return ["--" + name.replace("_", "-") for name in names if getattr(args, name) is None]


# ---------------------------------------------------------------------------- hardware


def add_device_options(parser: argparse.ArgumentParser, precision: bool = False) -> None:
    """Where a model runs (issue 14); ``precision``: also the network's arithmetic
    (``--precision``, ``--bf16``: the recipe's ``train.precision``)."""
    group = parser.add_argument_group("hardware")
    group.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help="auto (a CUDA GPU where there is one, else the CPU), cpu, cuda, cuda:N or mps; "
        "a model trained on one device runs on any other",
    )
    if precision:
        from dpq.config import PRECISIONS

        group.add_argument(
            "--precision",
            choices=list(PRECISIONS),
            help="network arithmetic: fp32, bf16, fp16 (GPUs) or auto (bf16 where the "
            "hardware has it natively); the quantizer and losses stay float32 (default: the "
            "recipe's)",
        )
        group.add_argument(
            "--bf16",
            action="store_const",
            const="bf16",
            dest="precision",
            help="the same as --precision bf16",
        )


def add_engine_options(parser: argparse.ArgumentParser, also: tuple[str, ...] = ()) -> None:
    """Who runs the network (issue 25): ``--engine`` and ``--onnx``. ``also``: more values
    ``--engine`` accepts without showing them (an older meaning of the flag)."""
    from dpq.inference.names import CLI_PRECISIONS, ENGINES, INSTALL_HINT

    group = parser.add_argument_group(f"inference engine (onnxruntime, openvino: {INSTALL_HINT})")
    group.add_argument(
        "--engine",
        choices=[*ENGINES, *also],
        default="torch",
        metavar="{" + ",".join(ENGINES) + "}",
        help="torch: the checkpoint in PyTorch; onnxruntime, openvino: its ONNX export on the "
        "CPU (--onnx, else exported once into MODEL_DIR/engine-cache/ and renewed when the "
        "checkpoint changes)",
    )
    group.add_argument(
        "--onnx",
        metavar="PATH",
        help="with --engine onnxruntime or openvino: an export of --model from `dpq export "
        "--onnx` (checked against the checkpoint) instead of the cached one",
    )
    group.add_argument(
        "--engine-precision",
        choices=CLI_PRECISIONS,
        default="fp32",
        help="the network's arithmetic: fp32 (default; the engines' codes equal torch's), "
        "bf16 (torch's autocast, or OpenVINO's bfloat16 inference: 2.3-2.9x faster than "
        "torch fp32 on a 2-core Zen 4 with AVX512-BF16; the codes of some items change, mAP "
        "barely: docs/RESULTS.md) or int8 (onnxruntime, openvino: an int8 export from `dpq "
        "export --onnx MODEL_DIR OUT --int8 --calibration IMAGES`, given with --onnx OUT)",
    )


def load_model(args: argparse.Namespace, path: str):  # -> RetrievalNetwork on --device
    """The checkpoint at ``path``, of any method, on ``--device``."""
    from dpq.devices import resolve_device
    from dpq.methods import load_network

    return load_network(path, device=resolve_device(args.device))


# ---------------------------------------------------------------------------- output


def add_quiet_option(parser: argparse.ArgumentParser, what: str = "progress output") -> None:
    """``--quiet``: nothing of ``what`` on stderr (errors and warnings still are)."""
    parser.add_argument("--quiet", action="store_true", help=f"no {what} on stderr")


def log_for(args: argparse.Namespace) -> Callable[[str], None] | None:
    """The ``log`` argument of the training flows: silent with ``--quiet``, else theirs."""
    return (lambda message: None) if args.quiet else None


def say(args: argparse.Namespace, message: str) -> None:
    """One line on stderr unless ``--quiet``."""
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def check_out(args: argparse.Namespace) -> None:
    """``--out``, when given, must be a file that can be written (checked before any work)."""
    if args.out is not None:
        from dpq.atomic import check_writable_file

        check_writable_file(args.out, "--out")


# ---------------------------------------------------------------------------- comma lists


def parse_methods(text: str | None) -> list[str]:
    """``"all"`` -> every baseline; ``"pq,opq"`` -> ["pq", "opq"]; None/"" -> []. Names are
    baselines, "float", or retrieval methods (:func:`dpq.methods.available_methods`, looked
    up only for a name that is neither, so that DPQ and the baselines import no torch)."""
    from dpq.evaluate.baselines import BASELINES

    if not text:
        return []
    if text.strip() == "all":
        return list(BASELINES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    known: tuple[str, ...] = (*BASELINES, "dpq", "float")
    if any(name not in known for name in names):
        from dpq.methods import available_methods

        known = (*BASELINES, *available_methods(), "float")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)} or 'all'."
        )
    return list(dict.fromkeys(names))


def parse_bits(text: str) -> list[int]:
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
