"""dpq.methods.dhn: DHN trained by the loop lowers its loss and its sign codes retrieve the
blobs through a saved BinaryIndex; its step loss is dhn_loss on tanh outputs; its settings."""

import numpy as np
import pytest
import torch

from conftest import TrainedMethod, blob_batch, method_config, seeded_network
from dpq.methods.base import Step
from dpq.methods.dhn import DHNMethod, DHNNetwork
from dpq.methods.hashing_losses import dhn_loss


def test_the_loop_trains_it_and_its_codes_retrieve_the_blobs(tmp_path):
    trained = TrainedMethod(method_config("dhn"), tmp_path)
    assert trained.loss_totals[-1] < 0.5 * trained.loss_totals[0]
    assert isinstance(trained.network, DHNNetwork)
    assert trained.features.shape == (400, 16) and np.abs(trained.features).max() < 1
    trained.check_sign_codes()
    assert trained.score > 0.9 > 3 * trained.chance
    trained.search_after_reload(tmp_path)


def test_the_step_loss_is_dhn_loss_on_tanh_outputs():
    method = DHNMethod(method_config("dhn", options={"quantization_weight": 2.0, "alpha": 0.25}))
    network = seeded_network(method)
    x, labels = blob_batch()
    out = method.forward_loss(
        network, method.build_loss(None), x, labels, Step(method.phase(False)), "fp32"
    )
    expected = dhn_loss(torch.tanh(network.hash_layer(x)), labels, 2.0, alpha=0.25)
    torch.testing.assert_close(out.loss.total, expected)


def test_its_settings_are_checked():
    method = DHNMethod(method_config("dhn"))
    assert method.options == {"lr_scale": 1.0, "quantization_weight": 0.1, "alpha": 0.5}
    with pytest.raises(ValueError, match="quantization_weight must be >= 0 for the dhn method"):
        DHNMethod(method_config("dhn", options={"quantization_weight": -1}))
    with pytest.raises(ValueError, match="alpha must be > 0 for the dhn method"):
        DHNMethod(method_config("dhn", options={"alpha": 0}))
