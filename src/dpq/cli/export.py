"""``dpq export --onnx MODEL_DIR OUT``: a trained model's encoder as an ONNX file for an
inference engine (:func:`dpq.inference.export_onnx`)."""

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
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dpq.inference.export import export_onnx, record_path

    record = export_onnx(
        args.model, args.out, image_size=args.image_size, tta_flip=args.tta_flip, opset=args.opset
    )
    shape = ", ".join(str(v) for v in record.input_shape)
    flip = ", flip-averaged" if record.tta_flip else ""
    print(
        f"wrote {args.out} (ONNX opset {record.opset}: {record.input_dtype} (N, {shape}) "
        f"{record.input_kind} -> float32 (N, {record.feature_dim}) features{flip}) and "
        f"{record_path(args.out).name}"
    )
    return 0
