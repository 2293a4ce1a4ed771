"""dpq.serve.encoder: the batching model thread (concurrent requests share one forward pass,
errors reach every waiting request) and loading a model for an index (its image size, its
codebooks, its input kind), with a small real DPQModel."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
torch = pytest.importorskip("torch")

from conftest import join_threads, wait_until  # noqa: E402
from dpq.config import DPQConfig, ModelConfig, QuantizerConfig  # noqa: E402
from dpq.index import DPQIndex  # noqa: E402
from dpq.model.network import DPQModel  # noqa: E402
from dpq.serve.encoder import AutocastModel, BatchingEncoder, load_served_model  # noqa: E402
from dpq.serve.settings import ServeSettings  # noqa: E402


def _model(image_size: int | None = None, backbone: str = "small_cnn") -> DPQModel:
    torch.manual_seed(0)
    kwargs = {"width": 0.25} if backbone == "small_cnn" else {"in_features": 6}
    config = DPQConfig(
        model=ModelConfig(
            backbone=backbone, backbone_kwargs=kwargs, num_classes=3, image_size=image_size
        ),
        quantizer=QuantizerConfig(num_levels=2, codebook_size=4, dim=8),
    )
    return DPQModel(config)


class _GatedModel:
    """The real model, behind a gate on its first call, recording each batch's size."""

    def __init__(self, model: DPQModel) -> None:
        self.model, self.sizes = model, []
        self.entered, self.release = threading.Event(), threading.Event()

    def extract_features(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        self.sizes.append(len(images))
        if len(self.sizes) == 1:
            self.entered.set()
            assert self.release.wait(10), "the test never opened the gate"
        if (images == 255).all():
            raise RuntimeError("a white image")
        return self.model.extract_features(images, batch_size=batch_size)


def test_waiting_requests_share_one_forward_pass():
    model = _model()
    gated = _GatedModel(model)
    encoder = BatchingEncoder(gated, max_batch=64)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8) for n in (1, 2, 3)]
    results: dict[int, np.ndarray] = {}

    def request(i: int) -> None:
        results[i] = encoder.features(batches[i])

    threads = [threading.Thread(target=request, args=(i,)) for i in range(3)]
    try:
        threads[0].start()
        assert gated.entered.wait(10), "the first request never reached the model"
        for thread in threads[1:]:
            thread.start()
        wait_until(  # both later requests wait behind the first
            lambda: encoder._queue.qsize() >= 2, 10, "the two later requests to queue"
        )
        gated.release.set()
        join_threads(threads, 10, "the three requests' features")
    finally:
        gated.release.set()
        encoder.close()
    assert gated.sizes == [1, 5]  # the two waiting requests went as one batch of 5
    for i, images in enumerate(batches):
        np.testing.assert_allclose(
            results[i], model.extract_features(images, batch_size=len(images)), atol=1e-5
        )


def test_an_error_reaches_the_request_and_the_thread_goes_on():
    gated = _GatedModel(_model())
    gated.release.set()
    encoder = BatchingEncoder(gated)
    try:
        with pytest.raises(RuntimeError, match="a white image"):
            encoder.features(np.full((1, 8, 8, 3), 255, np.uint8))
        assert encoder.features(np.zeros((2, 8, 8, 3), np.uint8)).shape == (2, 8)
    finally:
        encoder.close()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder")
    for name, model in [("plain", _model()), ("trained32", _model(image_size=32))]:
        model.save_checkpoint(root / name)
    _model(backbone="identity").save_checkpoint(root / "features")
    return root


def _index_of(model_dir) -> DPQIndex:
    return DPQIndex(DPQModel.from_checkpoint(model_dir).codebooks())


def test_image_size_comes_from_settings_then_training_then_the_source(checkpoints):
    plain, trained = checkpoints / "plain", checkpoints / "trained32"
    served = load_served_model(ServeSettings("x", plain, image_size=12), _index_of(plain))
    assert served.image_size == (12, 12) and served.info["name"] == "plain"
    assert len(served.info["weights_sha256"]) == 64 and served.info["backbone"] == "small_cnn"
    assert load_served_model(ServeSettings("x", trained), _index_of(trained)).image_size == (
        32,
        32,
    )
    from_source = load_served_model(ServeSettings("x", plain), _index_of(plain), (8, 9))
    assert from_source.image_size == (8, 9)
    with pytest.raises(ValueError, match="give --image-size"):
        load_served_model(ServeSettings("x", plain), _index_of(plain))


def test_a_model_of_other_codebooks_or_of_features_is_refused(checkpoints):
    plain = checkpoints / "plain"
    other = DPQIndex(np.random.default_rng(5).normal(size=(2, 4, 8)).astype(np.float32))
    with pytest.raises(ValueError, match="codebooks differ from the ones this index was built"):
        load_served_model(ServeSettings("x", plain, image_size=8), other)
    features = checkpoints / "features"
    with pytest.raises(ValueError, match="reads feature vectors, not images"):
        load_served_model(ServeSettings("x", features), _index_of(features))
    with pytest.raises(ValueError, match="no model to load"):
        load_served_model(ServeSettings("x"), other)


def test_the_encoder_gives_logits_when_the_model_has_them():
    model = _model()
    images = np.random.default_rng(3).integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    encoder = BatchingEncoder(model)
    try:
        features, logits = encoder.features_and_logits(images)
    finally:
        encoder.close()
    expected_features, expected_logits = model.extract_features_and_logits(images)
    np.testing.assert_allclose(features, expected_features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-6)
    gated = _GatedModel(model)
    gated.release.set()
    features_only = BatchingEncoder(gated)
    try:
        assert features_only.features_and_logits(images)[1] is None  # no classifier: None
    finally:
        features_only.close()


def test_torch_in_bf16_keeps_the_classifier_and_runs_in_autocast(checkpoints):
    plain = checkpoints / "plain"
    settings = ServeSettings("x", plain, image_size=12, engine_precision="bf16")
    served = load_served_model(settings, _index_of(plain))
    assert isinstance(served.model, AutocastModel) and served.model.precision == "bf16"
    assert served.info["engine"] == "torch" and served.info["engine_precision"] == "bf16"
    images = np.random.default_rng(5).integers(0, 256, (4, 12, 12, 3), dtype=np.uint8)
    network = DPQModel.from_checkpoint(plain)
    expected = network.extract_features_and_logits(images, precision="bf16")
    encoder = BatchingEncoder(served.model)
    try:
        features, logits = encoder.features_and_logits(images)
    finally:
        encoder.close()
    np.testing.assert_allclose(features, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, expected[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_an_engine_runs_the_served_model_at_the_served_size(checkpoints, tmp_path, engine):
    import shutil

    from conftest import needs_engine
    from dpq.serve.encoder import EngineModel

    needs_engine(engine)
    pytest.importorskip("onnxscript", reason="exporting needs the inference extra (onnxscript)")
    plain = shutil.copytree(checkpoints / "plain", tmp_path / "plain")  # the cache goes beside it
    settings = ServeSettings("x", plain, image_size=12, engine=engine, model_threads=1)
    served = load_served_model(settings, _index_of(plain))
    assert isinstance(served.model, EngineModel) and served.model.engine.name == engine
    assert served.image_size == (12, 12) and served.info["engine"] == engine
    assert served.info["engine_precision"] == "fp32"
    images = np.random.default_rng(4).integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
    expected = DPQModel.from_checkpoint(plain).extract_features(images)
    encoder = BatchingEncoder(served.model)
    try:
        features, predictions = encoder.predictions(images, False, None)
    finally:
        encoder.close()
    np.testing.assert_allclose(features, expected, atol=1e-4, rtol=0)
    assert predictions == [{}] * 5  # an exported encoder has no classifier output


def test_onnxruntime_serves_an_int8_export_given_as_onnx(checkpoints, tmp_path):
    """engine_precision int8 runs the int8 export of ``onnx`` (from `dpq export --int8`):
    features near float32's, not float32's."""
    import shutil

    from conftest import needs_engine
    from dpq.inference.export import export_onnx
    from dpq.inference.quantize import quantize_onnx

    needs_engine("onnxruntime")
    pytest.importorskip("onnxscript", reason="exporting needs the inference extra (onnxscript)")
    plain = shutil.copytree(checkpoints / "plain", tmp_path / "plain")
    export_onnx(plain, tmp_path / "f32.onnx", image_size=12)
    calibration = np.random.default_rng(6).integers(0, 256, (64, 12, 12, 3), dtype=np.uint8)
    quantize_onnx(tmp_path / "f32.onnx", tmp_path / "int8.onnx", calibration)
    settings = ServeSettings(
        "x", plain, image_size=12, engine="onnxruntime", onnx=tmp_path / "int8.onnx",
        engine_precision="int8", model_threads=1,
    )  # fmt: skip
    served = load_served_model(settings, _index_of(plain))
    assert served.info["engine_precision"] == "int8"
    assert served.model.engine.precision == "int8"
    images = np.random.default_rng(4).integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
    expected = DPQModel.from_checkpoint(plain).extract_features(images)
    encoder = BatchingEncoder(served.model)
    try:
        features = encoder.features(images)
    finally:
        encoder.close()
    scale = np.abs(expected).max()
    assert 1e-6 < np.abs(features - expected).max() < 0.2 * scale
