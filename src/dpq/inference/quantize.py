"""An exported encoder in int8, by ONNX Runtime's own static quantization (opt-in).

:func:`quantize_onnx` reads a float32 export (:mod:`dpq.inference.export`), calibrates the
activation ranges on training images (MinMax over at most :data:`CALIBRATION_ITEMS` of them,
evenly spaced) and writes a QDQ graph whose convolutions and matrix products run in int8
(per-channel int8 weights in 7 bits, uint8 activations); the input normalisation, the flip average
and the head's softmax stay in float32. Its record is the float32 record with
``precision="int8"``, the new file's SHA-256 and the calibration sample's SHA-256, so a
cache knows when the calibration changed. The features move (int8 is not float32): report
the mAP of int8 codes beside float32's before using it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dpq.atomic import check_writable_file, write_bytes_atomic, write_json_atomic
from dpq.inference.export import INPUT_NAME, ExportRecord, read_export, record_path
from dpq.inference.names import INSTALL_HINT, INT8_EXPORT_HINT

CALIBRATION_ITEMS = 512
"""Calibration images read at most (evenly spaced over the ones given)."""
CALIBRATION_BATCH = 64
INT8_SCHEME = "static QDQ int8, 7-bit weights (reduce_range)"
"""How the int8 graph is quantized, as its record's exporter names it; a cached int8 file
whose record does not name it is stale. Weights use 7 of their 8 bits (``reduce_range``):
ONNX Runtime multiplies uint8 activations by int8 weights with VPMADDUBSW on CPUs without
VNNI (AVX2 only), whose 16-bit pair sums saturate with full-range weights; measured on an
AVX2-only EPYC, full-range weights moved a small encoder's features by up to 19 % of their
range (7-bit: 3.9 %) and changed 57 % of its codes. The file must be right on whatever CPU
it runs on later, so every int8 file is quantized this way."""
QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]
"""The operators that run in int8; everything else stays float32."""


def calibration_sample(record: ExportRecord, calibration: Any) -> np.ndarray:
    """At most :data:`CALIBRATION_ITEMS` evenly spaced items of ``calibration`` (an array or
    an on-demand reader of the export's inputs), as one array."""
    if calibration is None or len(calibration) == 0:
        raise ValueError(
            "int8 needs calibration inputs: a few hundred training images of the model's "
            f"image size (calibration=...); on the command line, {INT8_EXPORT_HINT}."
        )
    record.check_inputs(calibration)
    count = min(len(calibration), CALIBRATION_ITEMS)
    rows = np.linspace(0, len(calibration) - 1, count).round().astype(np.int64)
    dtype = np.uint8 if record.input_kind == "images" else np.float32
    return np.ascontiguousarray(np.asarray(calibration[rows]), dtype=dtype)


def sample_sha256(sample: np.ndarray) -> str:
    """SHA-256 of a calibration sample's shape, dtype and bytes."""
    digest = hashlib.sha256(f"{sample.dtype}{sample.shape}".encode())
    digest.update(sample.tobytes())
    return digest.hexdigest()


def quantize_onnx(onnx_path: str | Path, out: str | Path, calibration: Any) -> ExportRecord:
    """Write the int8 version of the float32 export ``onnx_path`` to ``out`` (and its record
    to ``out.json``), calibrated on ``calibration`` (training inputs: uint8 (N, H, W, 3)
    images or float32 (N, F) rows, an array or an on-demand reader).

    Raises:
        ValueError: onnxruntime is missing, the export is not float32 or is damaged, or the
            calibration inputs do not fit it.
    """
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ValueError(
            f"int8 quantization needs the onnxruntime package: {INSTALL_HINT}."
        ) from None
    record = read_export(onnx_path)
    if record.precision != "fp32":
        raise ValueError(f"{onnx_path} is already {record.precision}; quantize a float32 export.")
    out = check_writable_file(out, "the int8 ONNX file")
    sample = calibration_sample(record, calibration)

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                {INPUT_NAME: sample[start : start + CALIBRATION_BATCH]}
                for start in range(0, len(sample), CALIBRATION_BATCH)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="dpq-int8-") as scratch:
        prepared, quantized = Path(scratch) / "prepared.onnx", Path(scratch) / "int8.onnx"
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantized),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,  # see INT8_SCHEME
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=QUANTIZED_OPS,
        )
        data = quantized.read_bytes()
    write_bytes_atomic(out, data)
    int8 = dataclasses.replace(
        record,
        precision="int8",
        onnx_sha256=hashlib.sha256(data).hexdigest(),
        exporter=f"{record.exporter}; onnxruntime.quantization {INT8_SCHEME} "
        f"({len(sample)} calibration items, MinMax)",
        calibration_sha256=sample_sha256(sample),
    )
    write_json_atomic(record_path(out), int8.to_dict(), sort_keys=True)
    return int8
