"""A trained model's encoder as ONNX: raw inputs in, searched features out.

The graph is what :meth:`dpq.model.retrieval_network.RetrievalNetwork.extract_features`
computes for one batch: uint8 (N, H, W, 3) images normalised by the model's mean/std (and
resized to ``model.image_size`` when that differs from the export's input size), the
backbone and the method's head up to the searched feature (:meth:`searched_features`:
semantic features rescaled when ``normalize_features``, or class posteriors), averaged with
the mirrored image when ``tta_flip``; or float32 (N, F) rows for the identity backbone. The
batch axis is dynamic, the image size is fixed at export.

Beside ``OUT`` (e.g. ``encoder.onnx``) a JSON record ``OUT.json`` (:class:`ExportRecord`)
names the checkpoint it came from (the weights' SHA-256 and a hash of the architecture
sections of its config), the input and output, the flip setting, the opset and the ONNX
file's own SHA-256, so that :func:`check_export` refuses a stale or altered export. Both files
are written atomically, the graph first and the record last.

The exporter is ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based one, the
default since torch 2.9; it needs the ``onnx`` and ``onnxscript`` packages of the
``inference`` extra).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpq.atomic import check_writable_file, write_bytes_atomic, write_json_atomic
from dpq.inference.names import INSTALL_HINT
from dpq.model.files import architecture, file_sha256, read_checkpoint_config

EXPORT_FORMAT = "dpq-onnx-encoder"
EXPORT_VERSION = 1
DEFAULT_OPSET = 18
INPUT_NAME = "inputs"
OUTPUT_NAME = "features"
RECORD_SUFFIX = ".json"


def record_path(onnx_path: str | Path) -> Path:
    """Where the record of the export ``onnx_path`` lives: ``<onnx_path>.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + RECORD_SUFFIX)


@dataclass(frozen=True)
class ExportRecord:
    """What an ONNX export holds and where it came from (the JSON beside the graph).

    Attributes:
        method: the checkpoint's ``method.name`` ("dpq", "sign", ...).
        weights_sha256: SHA-256 of the checkpoint's ``model.safetensors``.
        architecture_sha256: SHA-256 of its model, quantizer and method config sections.
        input_kind: "images" or "features".
        input_dtype: "uint8" (images) or "float32" (features).
        input_shape: one item's shape: (H, W, 3) or (F,); the batch axis comes first.
        feature_dim: D, the width of the float32 (N, D) output.
        tta_flip: the features are averaged with those of the mirrored image.
        opset: the ONNX opset.
        exporter: which exporter and torch version wrote the graph.
        onnx_sha256: SHA-256 of the ONNX file.
        precision: "fp32" (a graph as exported) or "int8" (:mod:`dpq.inference.quantize`).
        calibration_sha256: int8: SHA-256 of the calibration sample; "" for float32.
    """

    method: str
    weights_sha256: str
    architecture_sha256: str
    input_kind: str
    input_dtype: str
    input_shape: tuple[int, ...]
    feature_dim: int
    tta_flip: bool
    opset: int
    exporter: str
    onnx_sha256: str
    precision: str = "fp32"
    calibration_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the format and version."""
        return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the record") -> ExportRecord:
        """The record of :meth:`to_dict`; ValueError for another format or missing fields."""
        if data.get("format") != EXPORT_FORMAT or data.get("version") != EXPORT_VERSION:
            raise ValueError(
                f"{source} is format {data.get('format')!r} version {data.get('version')!r}; "
                f"this dpq reads {EXPORT_FORMAT!r} version {EXPORT_VERSION}: export again."
            )
        fields = {k: v for k, v in data.items() if k not in ("format", "version")}
        try:
            fields["input_shape"] = tuple(int(v) for v in fields["input_shape"])
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source} is incomplete or damaged ({exc}); export again.") from None

    def check_inputs(self, inputs: Any) -> None:
        """ValueError unless ``inputs`` (an array or an image reader) has this export's dtype
        kind and item shape."""
        shape = tuple(getattr(inputs, "shape", ()))
        dtype = np.dtype(getattr(inputs, "dtype", np.object_))
        expected = (None, *self.input_shape)
        if self.input_kind == "images":
            ok = dtype == np.uint8 and shape[1:] == self.input_shape
            fix = (
                f"decode the images at {self.input_shape[0]}x{self.input_shape[1]}, or export "
                "again with that image size"
            )
        else:
            ok = np.issubdtype(dtype, np.floating) and shape[1:] == self.input_shape
            fix = "give the features the model was trained on"
        if not ok or len(shape) != len(expected):
            raise ValueError(
                f"the exported encoder reads {self.input_dtype} {expected} {self.input_kind}; "
                f"got {dtype} {shape}: {fix}."
            )


class EncoderGraph(nn.Module):
    """The exported computation: raw inputs -> float32 (N, D) searched features.

    Args:
        network: a loaded :class:`~dpq.model.retrieval_network.RetrievalNetwork` (eval
            mode, channels-last off).
        tta_flip: average with the mirrored image (images only).
    """

    def __init__(self, network: nn.Module, tta_flip: bool) -> None:
        super().__init__()
        self.network = network
        self.tta_flip = bool(tta_flip)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) images or float32 (N, F) rows -> float32 (N, D)."""
        prepared = self.network.prepare_inputs(inputs)
        features, _ = self.network.searched_features(prepared, self.tta_flip)
        return features.float()


def checkpoint_fingerprint(model_dir: str | Path) -> tuple[str, str, str]:
    """(method name, weights SHA-256, architecture SHA-256) of a checkpoint directory, from
    its ``config.json`` (the weights' hash is the one :func:`dpq.model.files.load_weights`
    checks the file against)."""
    config, meta = read_checkpoint_config(model_dir)
    text = json.dumps(architecture(config), sort_keys=True, separators=(",", ":"))
    return (
        config.method.name,
        str(meta.get("weights_sha256")),
        hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )


def _input_shape(network: Any, image_size: int | tuple[int, int] | None) -> tuple[int, ...]:
    if network.input_kind != "images":
        return (int(network.backbone.out_features),)
    size = image_size if image_size is not None else network.config.model.image_size
    if size is None:
        raise ValueError(
            "the model does not fix its image size; give the size of the images it will read "
            "(image_size, --image-size), e.g. 32 for CIFAR-10."
        )
    height, width = (size, size) if isinstance(size, int) else size
    if min(int(height), int(width)) < 8:
        raise ValueError(f"image_size must be at least 8 pixels; got {size!r}.")
    return (int(height), int(width), 3)


def _onnx_model_bytes(graph: EncoderGraph, example: torch.Tensor, opset: int) -> bytes:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it; say so plainly)
    except ImportError:
        raise ValueError(
            f"exporting to ONNX needs the onnx and onnxscript packages: {INSTALL_HINT}."
        ) from None
    batch = torch.export.Dim("batch")
    # the exporter's progress lines, deprecation notes of its internals and notes about
    # torchvision's operators are not the user's business
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            program = torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
    finally:
        exporter_log.setLevel(level)
    return program.model_proto.SerializeToString()


def export_onnx(
    model_dir: str | Path,
    out: str | Path,
    image_size: int | tuple[int, int] | None = None,
    tta_flip: bool | None = None,
    opset: int = DEFAULT_OPSET,
) -> ExportRecord:
    """Write the encoder of the checkpoint ``model_dir`` to ``out`` (ONNX) and its record to
    ``out.json``.

    Args:
        model_dir: a checkpoint directory of any method (:func:`dpq.methods.load_network`).
        out: the ONNX file to write (replaced atomically).
        image_size: the side (or (height, width)) of the images the graph reads; default
            the model's ``model.image_size``; required when that is unset. Ignored for a
            feature backbone.
        tta_flip: average with the mirrored image (default: the model's ``model.tta_flip``).
        opset: the ONNX opset (18 or later: antialiased resizing needs 18).

    Returns:
        The record written beside the graph.
    """
    from dpq.methods import load_network

    if isinstance(opset, bool) or not isinstance(opset, int) or opset < DEFAULT_OPSET:
        raise ValueError(f"opset must be an integer >= {DEFAULT_OPSET}; got {opset!r}.")
    out = check_writable_file(out, "the ONNX file")
    method, weights_sha, arch_sha = checkpoint_fingerprint(model_dir)
    network = load_network(model_dir, channels_last=False).eval()
    flip = network.config.model.tta_flip if tta_flip is None else bool(tta_flip)
    flip = flip and network.input_kind == "images"
    shape = _input_shape(network, image_size)
    if network.input_kind == "images":
        example = torch.randint(0, 256, (2, *shape), dtype=torch.uint8)
    else:
        example = torch.randn(2, *shape)
    data = _onnx_model_bytes(EncoderGraph(network, flip).eval(), example, opset)
    write_bytes_atomic(out, data)
    record = ExportRecord(
        method=method,
        weights_sha256=weights_sha,
        architecture_sha256=arch_sha,
        input_kind=network.input_kind,
        input_dtype="uint8" if network.input_kind == "images" else "float32",
        input_shape=shape,
        feature_dim=int(network.feature_dim),
        tta_flip=flip,
        opset=opset,
        exporter=f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        onnx_sha256=hashlib.sha256(data).hexdigest(),
    )
    write_json_atomic(record_path(out), record.to_dict(), sort_keys=True)
    return record


def read_export(onnx_path: str | Path) -> ExportRecord:
    """The record of an export, checked against the ONNX file's SHA-256.

    Raises:
        FileNotFoundError: the ONNX file is missing.
        ValueError: the record is missing, damaged, or does not match the file.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} does not exist.")
    sidecar = record_path(onnx_path)
    try:
        data = json.loads(sidecar.read_text())
    except FileNotFoundError:
        raise ValueError(
            f"{onnx_path} has no record {sidecar.name} beside it; write both with "
            "`dpq export --onnx MODEL_DIR OUT`."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{sidecar} is not valid JSON ({exc}); export again.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{sidecar} is not an export record; export again.")
    record = ExportRecord.from_dict(data, source=str(sidecar))
    if file_sha256(onnx_path) != record.onnx_sha256:
        raise ValueError(
            f"{onnx_path} does not match the SHA-256 in {sidecar.name}: it was changed or "
            "half-copied after export; export again."
        )
    return record


def check_export(
    onnx_path: str | Path,
    model_dir: str | Path,
    image_size: int | tuple[int, int] | None = None,
    tta_flip: bool | None = None,
) -> ExportRecord:
    """The record of ``onnx_path`` after checking that it is the encoder of ``model_dir``
    now (same weights, same architecture) and, when given, of these settings.

    Raises:
        ValueError: a stale export (another checkpoint, image size or flip setting), or a
            damaged one (:func:`read_export`).
    """
    record = read_export(onnx_path)
    method, weights_sha, arch_sha = checkpoint_fingerprint(model_dir)
    if (record.method, record.weights_sha256, record.architecture_sha256) != (
        method,
        weights_sha,
        arch_sha,
    ):
        raise ValueError(
            f"{onnx_path} is stale: it was exported from another checkpoint than {model_dir} "
            f"(weights {record.weights_sha256[:12]}, now {weights_sha[:12]}); export again with "
            f"`dpq export --onnx {model_dir} {onnx_path}`."
        )
    if record.input_kind == "images" and image_size is not None:
        side = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if tuple(record.input_shape[:2]) != tuple(int(v) for v in side):
            raise ValueError(
                f"{onnx_path} reads {record.input_shape[0]}x{record.input_shape[1]} images, not "
                f"{side[0]}x{side[1]}; export again with that image size."
            )
    if tta_flip is not None and record.input_kind == "images" and record.tta_flip != tta_flip:
        raise ValueError(
            f"{onnx_path} was exported with tta_flip={record.tta_flip}, not {tta_flip}; export "
            "again with the setting you want."
        )
    return record
