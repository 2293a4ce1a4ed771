"""dpq.methods.hashnet: HashNet trained by the loop lowers its loss and its sign codes retrieve
the blobs through a saved BinaryIndex; its training outputs follow the continuation
tanh(beta z) at the step's beta; its step loss is hashnet_loss; its settings."""

import pytest
import torch

from conftest import TrainedMethod, blob_batch, method_config, seeded_network
from dpq.methods.base import Step
from dpq.methods.hashing_losses import hashnet_beta, hashnet_loss
from dpq.methods.hashnet import HashNetMethod, HashNetNetwork


def test_the_loop_trains_it_and_its_codes_retrieve_the_blobs(tmp_path):
    trained = TrainedMethod(method_config("hashnet"), tmp_path)
    assert trained.loss_totals[-1] < 0.5 * trained.loss_totals[0]
    assert isinstance(trained.network, HashNetNetwork)
    trained.check_sign_codes()
    assert trained.score > 0.9 > 3 * trained.chance
    trained.search_after_reload(tmp_path)


def test_training_reads_tanh_beta_z_at_the_steps_beta():
    method = HashNetMethod(method_config("hashnet", options={"step_size": 10, "gamma": 0.1}))
    assert [method.beta(s) for s in (0, 9, 10, 45)] == [1.0, 1.0, 2.0**0.5, 5.0**0.5]
    assert method.beta(45) == hashnet_beta(45, gamma=0.1, power=0.5, step_size=10)
    network = seeded_network(method)
    x, labels = blob_batch()
    z = network.hash_layer(x)
    phase = method.phase(False)
    for step in (0, 45):
        outputs = method.training_outputs(network, x, Step(phase, step=step), "fp32")
        torch.testing.assert_close(outputs, torch.tanh(method.beta(step) * z))
    out = method.forward_loss(
        network, method.build_loss(None), x, labels, Step(phase, step=45), "fp32"
    )
    expected = hashnet_loss(torch.tanh(5.0**0.5 * z), labels, alpha=10.0 / 16)
    torch.testing.assert_close(out.loss.total, expected)
    features, _ = network.searched_features(x)
    torch.testing.assert_close(features, torch.tanh(z))  # the signs of z


def test_its_settings_are_checked():
    method = HashNetMethod(method_config("hashnet", bits=32))
    assert method.options == {
        "lr_scale": 1.0, "alpha": 10.0 / 32, "gamma": 0.005, "power": 0.5, "step_size": 200
    }  # fmt: skip
    with pytest.raises(ValueError, match="step_size must be a whole number for the hashnet method"):
        HashNetMethod(method_config("hashnet", options={"step_size": 2.5}))
    with pytest.raises(ValueError, match="alpha must be > 0 for the hashnet method"):
        HashNetMethod(method_config("hashnet", options={"alpha": 0}))
