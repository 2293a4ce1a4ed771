"""``dpq export --onnx MODEL_DIR OUT``: a trained model's encoder as an ONNX file for an
inference engine (:func:`dpq.inference.export_onnx`); with ``--int8 --calibration IMAGES``
its int8 version (:func:`dpq.inference.quantize.quantize_onnx`)."""

from __future__ import annotations

import argparse

from dpq.cli.options import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "export",
        help="write a model's encoder as ONNX for an inference engine",
        description="Write the encoder of a trained model (input normalisation, backbone and "
        "head up to the searched features, flip-averaging when the model uses it) as ONNX with "
        "a dynamic batch axis, and beside it OUT.json, which names the checkpoint it came from "
        "so that a stale export is refused. Needs the inference extra: "
        "pip install 'dpq[inference]'.",
    )
    form = parser.add_mutually_exclusive_group(required=True)
    form.add_argument("--onnx", action="store_true", help="write ONNX (the one format today)")
    parser.add_argument("model", metavar="MODEL_DIR", help="a checkpoint directory")
    parser.add_argument("out", metavar="OUT", help="the ONNX file to write (e.g. encoder.onnx)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="side of the images the encoder reads (default: the model's image size; "
        "required when the model does not fix one, e.g. 32 for CIFAR-10)",
    )
    parser.add_argument(
        "--tta-flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average with the mirrored image (default: as the model was configured)",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (18 or later)")
    int8 = parser.add_argument_group(
        "int8 (ONNX Runtime's static quantization; run with --engine onnxruntime or openvino "
        "--engine-precision int8 --onnx OUT)"
    )
    int8.add_argument(
        "--int8",
        action="store_true",
        help="write the encoder with its convolutions and matrix products in int8 (per-channel "
        "int8 weights, activation ranges calibrated on --calibration); its codes differ from "
        "float32's for many items (62 %% on CIFAR-10, mAP +0.001): compare mAP before serving "
        "it (benchmarks/engine_map.py, docs/RESULTS.md)",
    )
    int8.add_argument(
        "--calibration",
        metavar="IMAGES",
        help="with --int8: training images whose activations set the int8 ranges (a source as "
        "for `dpq train`; at most 512, evenly spaced, are read, at the encoder's image size)",
    )
    int8.add_argument(
        "--split",
        metavar="SPLIT",
        help="with --calibration: read only the split's training images (`dpq data split`)",
    )
    int8.add_argument(
        "--image-root", help="with --calibration: the folder or zip of a list file's images"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dpq.inference.export import export_onnx, record_path

    _check_int8_flags(args)
    if args.int8:
        record = _export_int8(args)
    else:
        record = export_onnx(
            args.model,
            args.out,
            image_size=args.image_size,
            tta_flip=args.tta_flip,
            opset=args.opset,
        )
    shape = ", ".join(str(v) for v in record.input_shape)
    flip = ", flip-averaged" if record.tta_flip else ""
    int8 = ", int8" if record.precision == "int8" else ""
    print(
        f"wrote {args.out} (ONNX opset {record.opset}{int8}: {record.input_dtype} (N, {shape}) "
        f"{record.input_kind} -> float32 (N, {record.feature_dim}) features{flip}) and "
        f"{record_path(args.out).name}"
    )
    return 0


def _check_int8_flags(args: argparse.Namespace) -> None:
    if args.int8 and args.calibration is None:
        raise ValueError(
            "--int8 needs --calibration IMAGES: a few hundred training images whose "
            "activations set the int8 ranges."
        )
    given = [f"--{name.replace('_', '-')}" for name in ("calibration", "split", "image_root")
             if getattr(args, name) is not None]  # fmt: skip
    if given and not args.int8:
        raise ValueError(
            f"{', '.join(given)} apply to --int8 exports; add --int8 or leave them out."
        )


def _export_int8(args: argparse.Namespace):  # -> ExportRecord
    """The float32 export in a scratch folder, then its int8 version at OUT, calibrated on
    --calibration's (training) images read at the encoder's input size."""
    import tempfile
    from pathlib import Path

    from dpq.data import Split, load_source
    from dpq.inference.export import export_onnx
    from dpq.inference.quantize import quantize_onnx

    with tempfile.TemporaryDirectory(prefix="dpq-export-") as scratch:
        float_path = Path(scratch) / "encoder.onnx"
        record = export_onnx(
            args.model, float_path, image_size=args.image_size, tta_flip=args.tta_flip,
            opset=args.opset,
        )  # fmt: skip
        size = tuple(record.input_shape[:2]) if record.input_kind == "images" else None
        source = load_source(
            args.calibration,
            image_root=args.image_root,
            image_size=size,
            in_memory=False,  # on demand: only the calibration sample is decoded
            progress=False,
        )
        calibration = source.inputs
        if args.split is not None:
            rows = Split.load(args.split).rows("train", len(source), args.calibration)
            calibration, _ = source.rows(rows)
        return quantize_onnx(float_path, args.out, calibration)
