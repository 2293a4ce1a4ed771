"""dpq.training.codebook_init: the training features codebooks start from (eval mode, or as
the training loss sees them with BatchNorm on batch statistics, running statistics left
alone), and the method's initialisation on them (one process; two ranks are covered by
tests/test_ddp.py through the loop)."""

import numpy as np
import pytest
import torch

from conftest import digits_config, feature_config, feature_data
from dpq.data.loading import BatchReader
from dpq.methods import method_for
from dpq.model.network import DPQModel
from dpq.training.codebook_init import TrainingFeatures, initialise_codebooks


def _features(model, inputs, batch_size=64):
    return TrainingFeatures(model, inputs, BatchReader(inputs, device=model.device), batch_size)


def test_eval_features_are_the_searched_features_without_flip(digits):
    torch.manual_seed(0)
    model = DPQModel(digits_config().replace(model={"tta_flip": True}))
    features = _features(model, digits.images)
    expected = model.extract_features(digits.images, tta_flip=False)
    np.testing.assert_array_equal(features.eval_mode(), expected)
    np.testing.assert_array_equal(features.of_kind("eval"), expected)
    with pytest.raises(ValueError, match="one of"):
        features.of_kind("augmented")


def test_features_as_trained_use_batch_statistics_and_leave_the_running_ones(digits):
    torch.manual_seed(0)
    model = DPQModel(digits_config())
    model.eval()
    before = {name: b.clone() for name, b in model.named_buffers()}
    features = _features(model, digits.images, batch_size=80)
    as_trained = features.as_trained()
    assert as_trained.shape == (240, 12) and not model.training
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, before[name], rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        x = model.prepare_inputs(torch.from_numpy(digits.images[80:160]))
        batch = model.forward_features(x).numpy()
    np.testing.assert_allclose(as_trained[80:160], batch, rtol=1e-5, atol=1e-6)
    assert not np.allclose(as_trained, features.eval_mode(), atol=1e-3)  # not eval mode
    rows = np.array([5, 100, 7])
    np.testing.assert_allclose(
        features.as_trained(rows), _features(model, digits.images[rows]).as_trained(), rtol=1e-5
    )


def test_the_method_initialises_the_codebooks_and_the_line_is_logged():
    config = feature_config()
    torch.manual_seed(0)
    model = DPQModel(config)
    features = _features(model, feature_data().images).eval_mode()
    messages = []
    errors = initialise_codebooks(method_for(config), model, features, log=messages.append)
    twin = DPQModel(config)
    expected = twin.quantizer.init_kmeans(features, iterations=20, seed=0)
    np.testing.assert_allclose(errors, expected)
    torch.testing.assert_close(model.quantizer.codebooks, twin.quantizer.codebooks)
    assert messages == [
        "k-means codebook init on 120 training features: mean squared error per level "
        + " ".join(f"{e:.4g}" for e in errors)
    ]
    sign = feature_config().replace(method={"name": "sign", "bits": 8})
    with pytest.raises(ValueError, match="'sign' method has no codebooks"):
        initialise_codebooks(method_for(sign), model, features)
