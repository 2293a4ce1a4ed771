"""DPQModel: forward shapes, feature extraction, codes, checkpoints and their errors."""

import numpy as np
import pytest
import torch

from conftest import small_config
from dpq.config import (
    DPQConfig,
    ModelConfig,
    QuantizerConfig,
)
from dpq.model.network import DPQModel
from dpq.recipes import ABLATIONS, ablation_config


def test_forward_shapes(model, images):
    x = model.prepare_inputs(torch.from_numpy(images))
    assert x.shape == (9, 3, 8, 8) and x.dtype == torch.float32
    out = model(x)
    assert out.features.shape == (9, 10) and out.features.abs().max() <= 1.0  # tanh
    assert out.logits.shape == (9, 4)
    assert out.quantized.soft.shape == (9, 3, 10) and out.quantized.codes.shape == (9, 3)
    assert model(x, quantize=False).quantized is None


def test_classifier_input_choice(images):
    config = small_config().replace(model={"classifier_input": "backbone"})
    model = DPQModel(config)
    assert model.classifier.in_features == model.backbone.out_features
    assert model(model.prepare_inputs(torch.from_numpy(images))).logits.shape == (9, 4)


def test_extract_features_is_batched_eval_and_deterministic(model, images):
    model.train()
    whole = model.extract_features(images)
    assert model.training  # mode restored
    assert whole.dtype == np.float32 and whole.shape == (9, 10)
    pieces = model.extract_features(images, batch_size=2)
    np.testing.assert_allclose(whole, pieces, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(model.embed(images), whole)


def test_flip_averaging(model, images):
    mirrored = images[:, :, ::-1].copy()
    averaged = model.extract_features(images, tta_flip=True)
    expected = 0.5 * (model.extract_features(images) + model.extract_features(mirrored))
    np.testing.assert_allclose(averaged, expected, rtol=1e-5, atol=1e-6)


def test_normalized_features_have_norm_sqrt_d_with_and_without_flip(images):
    torch.manual_seed(0)
    model = DPQModel(small_config().replace(model={"normalize_features": True}))
    x = model.prepare_inputs(torch.from_numpy(images))
    norms = model(x).features.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 10**0.5))
    for flip in (False, True):
        features = model.extract_features(images, tta_flip=flip)
        np.testing.assert_allclose(np.linalg.norm(features, axis=1), 10**0.5, rtol=1e-5)
    # same weights without the option: the same directions
    plain = DPQModel(small_config())
    plain.load_state_dict(model.state_dict())
    raw = plain.extract_features(images)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(model.extract_features(images), unit * 10**0.5, rtol=1e-4)


def test_codes_dtype_and_consistency(model, images):
    codes = model.encode(images)
    assert codes.dtype == np.uint8 and codes.shape == (9, 3)
    np.testing.assert_array_equal(model.encode(images, num_levels=2), codes[:, :2])
    features = model.extract_features(images)
    quantized = model.quantizer(torch.from_numpy(features))
    np.testing.assert_array_equal(codes, quantized.codes.numpy())
    assert model.codebooks().shape == (3, 16, 10) and model.codebooks().dtype == np.float32
    big = DPQModel(small_config(codebook_size=512))
    assert big.encode(images).dtype == np.uint16


def test_identity_backbone_takes_features():
    config = DPQConfig(
        model=ModelConfig(backbone="identity", backbone_kwargs={"in_features": 6}, num_classes=3),
        quantizer=QuantizerConfig(num_levels=2, codebook_size=4, dim=5),
    )
    model = DPQModel(config)
    features = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    assert model.extract_features(features).shape == (4, 5)
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        model.extract_features(features[:, :5])


def test_bad_images_raise(model, images):
    with pytest.raises(ValueError, match="uint8 of shape"):
        model.extract_features(images.astype(np.float32))
    with pytest.raises(ValueError, match="uint8 of shape"):
        model.extract_features(images[..., 0])
    with pytest.raises(ValueError, match="batch_size"):
        model.extract_features(images, batch_size=0)


def posterior_config(multilabel: bool = False, temperature: float = 1.0) -> DPQConfig:
    return small_config().replace(
        model={
            "feature": "class_posterior",
            "posterior_temperature": temperature,
            "multilabel": multilabel,
        }
    )


@pytest.mark.parametrize("multilabel", [False, True])
def test_class_posterior_features_are_the_classifier_probabilities(images, multilabel):
    torch.manual_seed(0)
    model = DPQModel(posterior_config(multilabel, temperature=0.5))
    out = model(model.prepare_inputs(torch.from_numpy(images)))
    scaled = out.logits.float() / 0.5
    expected = torch.sigmoid(scaled) if multilabel else torch.softmax(scaled, dim=1)
    torch.testing.assert_close(out.features[:, :4], expected * 10**0.5)  # times sqrt(D)
    assert out.features.shape == (9, 10) and (out.features[:, 4:] == 0).all()
    assert out.quantizer_input is out.features  # what the codebooks learn
    assert out.semantic.shape == (9, 10) and out.semantic.abs().max() <= 1.0  # L_S reads tanh
    assert not torch.allclose(out.semantic, out.features)
    if not multilabel:
        torch.testing.assert_close(out.features.sum(1), torch.full((9,), 10**0.5))


def test_class_posterior_with_flip_is_the_posterior_of_the_averaged_logits(images):
    torch.manual_seed(0)
    model = DPQModel(posterior_config().replace(model={"tta_flip": True}))
    features, logits = model.extract_features_and_logits(images)
    mirrored = images[:, :, ::-1].copy()
    plain = model.extract_features_and_logits(images, tta_flip=False)[1]
    averaged = 0.5 * (plain + model.extract_features_and_logits(mirrored, tta_flip=False)[1])
    np.testing.assert_allclose(logits, averaged, rtol=1e-5, atol=1e-6)
    expected = torch.softmax(torch.from_numpy(averaged), dim=1).numpy() * 10**0.5
    np.testing.assert_allclose(features[:, :4], expected, rtol=1e-5, atol=1e-6)


def test_class_posterior_config_errors():
    assert ModelConfig().search_mode == "aqd"
    assert ModelConfig(feature="class_posterior").search_mode == "ip"
    with pytest.raises(ValueError, match="classifier_input to 'backbone'"):
        ModelConfig(feature="class_posterior", classifier_input="semantic")
    with pytest.raises(ValueError, match="quantizer.dim to at least 4"):
        posterior_config().replace(quantizer={"dim": 3})
    with pytest.raises(ValueError, match="model.feature must be one of"):
        ModelConfig(feature="posterior")
    with pytest.raises(ValueError, match="posterior_temperature must be a finite number > 0"):
        ModelConfig(feature="class_posterior", posterior_temperature=0)
    with pytest.raises(ValueError, match="no classifier is trained"):
        posterior_config().replace(loss={"use_cls": False})
    # the ablations without L_C fall back to the semantic features; the others keep the base's
    features = {name: ablation_config(name, posterior_config()).model.feature for name in ABLATIONS}
    assert features.pop("E") == features.pop("E+LS") == "semantic"
    assert set(features.values()) == {"class_posterior"}
