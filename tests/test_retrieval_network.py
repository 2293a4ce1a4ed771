"""dpq.model.retrieval_network: what every method's network shares (image statistics, input
checks, feature extraction, checkpoints refusing another method's files), through a small
subclass with a linear head."""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import feature_config
from dpq.config import DPQConfig
from dpq.model.retrieval_network import RetrievalNetwork, image_statistics


class LinearHead(RetrievalNetwork):
    """backbone -> Linear(F, 3), no classifier: the smallest network a method could have."""

    method_name = "linear-test"

    def __init__(self, config: DPQConfig) -> None:
        super().__init__(config)
        self.head = nn.Linear(int(self.backbone.out_features), 3)

    @property
    def feature_dim(self) -> int:
        return 3

    @property
    def logits_dim(self) -> int:
        return 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def searched_features(self, x, tta_flip=None):
        features = self.forward_features(x).float()
        return features, features.new_zeros((len(x), 0))


def test_image_statistics():
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    images[..., 0] = 255
    images[1, ..., 1] = 255
    mean, std = image_statistics(images)
    assert mean == pytest.approx((1.0, 0.5, 0.0))
    assert std[1] == pytest.approx(0.5) and std[2] == pytest.approx(1e-3)


def test_a_subclass_gets_inputs_features_and_batches_from_the_base():
    torch.manual_seed(0)
    network = LinearHead(feature_config())
    inputs = np.random.default_rng(0).normal(size=(10, 12)).astype(np.float32)
    assert network.input_kind == "features" and network.device == torch.device("cpu")
    features, logits = network.extract_features_and_logits(inputs, batch_size=4)
    expected = network.head(torch.from_numpy(inputs)).detach().numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-6)
    assert logits.shape == (10, 0) and network.embed(inputs).shape == (10, 3)
    with pytest.raises(ValueError, match=r"shape \(N, 12\)"):
        network.check_inputs(inputs[:, :5])
    with pytest.raises(TypeError):
        RetrievalNetwork(feature_config())  # abstract: a method says what its features are


def test_from_checkpoint_loads_its_own_method_and_refuses_another(tmp_path):
    torch.manual_seed(0)
    config = feature_config().replace(method={"name": "linear-test"})
    network = LinearHead(config)
    network.save_checkpoint(tmp_path / "mine")
    loaded = LinearHead.from_checkpoint(tmp_path / "mine")
    torch.testing.assert_close(loaded.head.weight, network.head.weight)
    assert not loaded.training
    from dpq.model.network import DPQModel

    with pytest.raises(ValueError, match="holds a 'linear-test' model, not a 'dpq' one"):
        DPQModel.from_checkpoint(tmp_path / "mine")
