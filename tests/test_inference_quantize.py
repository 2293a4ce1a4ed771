"""dpq.inference.quantize: ONNX Runtime's static int8 quantization of an export, calibrated on
training inputs: the graph runs its convolutions in int8 (QDQ), its features stay close to
float32's but are not float32's, and its record says int8 and which calibration it had."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import encoder_inputs
from dpq.inference.export import INPUT_NAME, read_export
from dpq.inference.quantize import CALIBRATION_ITEMS, calibration_sample, quantize_onnx

ort = pytest.importorskip("onnxruntime", reason="int8 quantization needs onnxruntime")


def _run(onnx_path, inputs):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: inputs})[0]


def test_int8_graph_is_quantized_and_close_to_float32(exported_encoders, tmp_path):
    onnx = pytest.importorskip("onnx", reason="reading the graph needs onnx")
    _, float_path = exported_encoders["resnet9"]
    record = quantize_onnx(float_path, tmp_path / "int8.onnx", encoder_inputs("resnet9", 300, 1))
    assert record.precision == "int8" and len(record.calibration_sha256) == 64
    assert read_export(tmp_path / "int8.onnx") == record
    same = ("input_shape", "feature_dim", "weights_sha256", "tta_flip")
    assert all(getattr(record, f) == getattr(read_export(float_path), f) for f in same)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    images = encoder_inputs("resnet9", 200)
    exact, int8 = _run(float_path, images), _run(tmp_path / "int8.onnx", images)
    cosine = (exact * int8).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(int8, axis=1)
    assert cosine.mean() > 0.99, cosine.mean()
    assert np.abs(exact - int8).max() > 1e-4  # int8 arithmetic, not the float32 graph


def test_quantizing_needs_calibration_and_a_float32_export(exported_encoders, tmp_path):
    _, float_path = exported_encoders["identity"]
    with pytest.raises(ValueError, match="int8 needs calibration inputs"):
        quantize_onnx(float_path, tmp_path / "int8.onnx", None)
    with pytest.raises(ValueError, match=r"reads float32 \(None, 12\) features"):
        quantize_onnx(float_path, tmp_path / "int8.onnx", np.zeros((5, 3), np.float32))
    quantize_onnx(float_path, tmp_path / "int8.onnx", encoder_inputs("identity", 100, 1))
    with pytest.raises(ValueError, match="is already int8; quantize a float32 export"):
        quantize_onnx(
            tmp_path / "int8.onnx", tmp_path / "again.onnx", encoder_inputs("identity", 9)
        )


def test_calibration_sample_is_evenly_spaced_and_bounded(exported_encoders):
    record = read_export(exported_encoders["identity"][1])
    rows = np.arange(2000 * 12, dtype=np.float32).reshape(2000, 12)
    sample = calibration_sample(record, rows)
    assert sample.shape == (CALIBRATION_ITEMS, 12)
    np.testing.assert_array_equal(sample[[0, -1]], rows[[0, -1]])
    assert calibration_sample(record, rows[:7]).shape == (7, 12)
