"""dpq.inference.export: the encoder graph equals the model's own feature extraction (run by
ONNX Runtime directly), for features through the identity backbone, a ResNet-9 on 32 px
images and the CIFAR-10 recipe's flip-averaged class posteriors, at any batch size; the
record beside the graph detects a stale or altered export."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import ENCODER_MODELS, encoder_inputs
from dpq.config import DPQConfig, ModelConfig, QuantizerConfig
from dpq.inference.export import (
    INPUT_NAME,
    EncoderGraph,
    check_export,
    export_onnx,
    read_export,
    record_path,
)
from dpq.methods import load_network
from dpq.model.files import read_checkpoint_config
from dpq.model.network import DPQModel


def _session(onnx_path):
    ort = pytest.importorskip("onnxruntime", reason="running the graph needs onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _copy_export(exported, name, tmp_path):
    """A private copy of one exported model (checkpoint and files), for tests that alter it."""
    model_dir, onnx_path = exported[name]
    target = tmp_path / name
    shutil.copytree(model_dir, target / "model")
    shutil.copy(onnx_path, target / "encoder.onnx")
    shutil.copy(record_path(onnx_path), record_path(target / "encoder.onnx"))
    return target / "model", target / "encoder.onnx"


@pytest.mark.parametrize("name", ENCODER_MODELS)
def test_graph_equals_the_models_features_at_any_batch_size(
    exported_encoders, encoder_references, name
):
    inputs, expected = encoder_references[name]
    session = _session(exported_encoders[name][1])
    for batch, count in ((1, 3), (7, 21), (400, 400)):
        got = np.concatenate(
            [
                session.run(None, {INPUT_NAME: inputs[start : start + batch]})[0]
                for start in range(0, count, batch)
            ]
        )
        assert got.dtype == np.float32 and got.shape == (count, expected.shape[1])
        np.testing.assert_allclose(got, expected[:count], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ENCODER_MODELS)
def test_record_names_the_checkpoint_input_and_settings(exported_encoders, name):
    model_dir, onnx_path = exported_encoders[name]
    config, meta = read_checkpoint_config(model_dir)
    record = read_export(onnx_path)
    assert record.method == "dpq"
    assert record.weights_sha256 == meta["weights_sha256"]
    assert record.feature_dim == config.quantizer.dim
    assert record.opset == 18
    if name == "identity":
        assert (record.input_kind, record.input_dtype, record.input_shape) == (
            "features",
            "float32",
            (12,),
        )
        assert record.tta_flip is False
    else:
        assert (record.input_kind, record.input_dtype, record.input_shape) == (
            "images",
            "uint8",
            (32, 32, 3),
        )
        assert record.tta_flip is config.model.tta_flip
    assert check_export(onnx_path, model_dir) == record
    on_disk = json.loads(record_path(onnx_path).read_text())
    assert on_disk["format"] == "dpq-onnx-encoder" and on_disk["version"] == 1


def test_the_recipe_graph_averages_the_mirror_and_can_leave_it_out(exported_encoders, tmp_path):
    model_dir, onnx_path = exported_encoders["recipe"]
    assert read_export(onnx_path).tta_flip is True
    plain = tmp_path / "no-flip.onnx"
    record = export_onnx(model_dir, plain, image_size=32, tta_flip=False)
    assert record.tta_flip is False
    images = encoder_inputs("recipe", 40)
    network = load_network(model_dir)
    without = network.extract_features(images, tta_flip=False)
    with_flip = network.extract_features(images, tta_flip=True)
    assert np.abs(without - with_flip).max() > 1e-3  # the flip matters for these images
    got = _session(plain).run(None, {INPUT_NAME: images})[0]
    np.testing.assert_allclose(got, without, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="tta_flip=False, not True"):
        check_export(plain, model_dir, tta_flip=True)


def test_the_graph_resizes_to_the_models_image_size(tmp_path):
    torch.manual_seed(0)
    config = DPQConfig(
        model=ModelConfig(backbone="small_cnn", backbone_kwargs={"width": 0.25}, image_size=40),
        quantizer=QuantizerConfig(num_levels=2, codebook_size=4, dim=8),
    )
    DPQModel(config).eval().save_checkpoint(tmp_path / "model")
    record = export_onnx(tmp_path / "model", tmp_path / "up.onnx")
    assert record.input_shape == (40, 40, 3)  # the model's own size by default
    record = export_onnx(tmp_path / "model", tmp_path / "from32.onnx", image_size=32)
    assert record.input_shape == (32, 32, 3)
    images = encoder_inputs("resnet9", 20)
    expected = load_network(tmp_path / "model").extract_features(images)
    got = _session(tmp_path / "from32.onnx").run(None, {INPUT_NAME: images})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_a_model_without_an_image_size_needs_one(exported_encoders, tmp_path):
    model_dir, _ = exported_encoders["resnet9"]
    with pytest.raises(ValueError, match="give the size of the images"):
        export_onnx(model_dir, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(ValueError, match="opset must be an integer >= 18"):
        export_onnx(model_dir, tmp_path / "x.onnx", image_size=32, opset=13)


def test_a_stale_export_is_refused(exported_encoders, tmp_path):
    model_dir, onnx_path = _copy_export(exported_encoders, "identity", tmp_path)
    check_export(onnx_path, model_dir)
    network = load_network(model_dir)
    with torch.no_grad():
        network.semantic_head.bias.add_(0.5)
    network.save_checkpoint(model_dir)  # the checkpoint moved on (e.g. trained further)
    with pytest.raises(ValueError, match="is stale: it was exported from another checkpoint"):
        check_export(onnx_path, model_dir)


def test_an_export_of_another_size_is_refused(exported_encoders):
    model_dir, onnx_path = exported_encoders["resnet9"]
    with pytest.raises(ValueError, match="reads 32x32 images, not 64x64"):
        check_export(onnx_path, model_dir, image_size=64)


def test_an_altered_or_unrecorded_export_is_refused(exported_encoders, tmp_path):
    model_dir, onnx_path = _copy_export(exported_encoders, "identity", tmp_path)
    with open(onnx_path, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        read_export(onnx_path)
    record_path(onnx_path).write_text('{"format": "dpq-onnx-encoder", "version": 7}')
    with pytest.raises(ValueError, match="version 7"):
        read_export(onnx_path)
    record_path(onnx_path).unlink()
    with pytest.raises(ValueError, match="has no record encoder.onnx.json beside it"):
        read_export(onnx_path)
    with pytest.raises(FileNotFoundError):
        read_export(tmp_path / "missing.onnx")


def test_record_checks_the_inputs_it_is_given(exported_encoders):
    record = read_export(exported_encoders["resnet9"][1])
    record.check_inputs(np.zeros((5, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"reads uint8 \(None, 32, 32, 3\) images; got uint8"):
        record.check_inputs(np.zeros((5, 40, 40, 3), np.uint8))
    with pytest.raises(ValueError, match="got float32"):
        record.check_inputs(np.zeros((5, 32, 32, 3), np.float32))
    features = read_export(exported_encoders["identity"][1])
    features.check_inputs(np.zeros((3, 12), np.float64))
    with pytest.raises(ValueError, match=r"reads float32 \(None, 12\) features"):
        features.check_inputs(np.zeros((3, 11), np.float32))


def test_encoder_graph_is_the_searched_features_of_raw_inputs(exported_encoders):
    network = load_network(exported_encoders["recipe"][0], channels_last=False)
    images = encoder_inputs("recipe", 8)
    with torch.inference_mode():
        got = EncoderGraph(network, tta_flip=True)(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(got, network.extract_features(images, tta_flip=True), atol=1e-6)
