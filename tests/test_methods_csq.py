"""dpq.methods.csq: CSQ trained by the loop lowers its loss and its sign codes retrieve the
blobs through a saved BinaryIndex; its hash centres are fixed, saved with the model and read
by its step loss; its settings."""

import numpy as np
import pytest
import torch

from conftest import TrainedMethod, blob_batch, method_config, seeded_network
from dpq.methods.base import Step
from dpq.methods.csq import CSQMethod, CSQNetwork
from dpq.methods.hashing_losses import csq_centre_of, csq_loss, hadamard_centres


def test_the_loop_trains_it_and_its_codes_retrieve_the_blobs(tmp_path):
    config = method_config("csq")
    trained = TrainedMethod(config, tmp_path)
    assert trained.loss_totals[-1] < 0.5 * trained.loss_totals[0]
    assert isinstance(trained.network, CSQNetwork)
    centres = hadamard_centres(4, 16, seed=0)
    torch.testing.assert_close(trained.network.centres, centres)  # loaded, never trained
    trained.check_sign_codes()
    assert trained.score > 0.9 > 3 * trained.chance
    # items land near their class's centre
    signs = np.where(trained.features > 0, 1.0, -1.0)
    nearest = (signs @ centres.numpy().T).argmax(axis=1)
    assert (nearest == trained.data.labels).mean() > 0.9
    trained.search_after_reload(tmp_path)


def test_the_step_loss_pulls_towards_the_networks_own_centres():
    method = CSQMethod(method_config("csq", bits=24, options={"quantization_weight": 0.5}))
    network = seeded_network(method)
    assert "centres" in network.state_dict() and not network.centres.requires_grad
    torch.testing.assert_close(network.centres, hadamard_centres(4, 24, seed=0))
    with torch.no_grad():
        network.centres.neg_()  # the loss reads the network's centres, whatever they are
    x, labels = blob_batch()
    out = method.forward_loss(
        network, method.build_loss(None), x, labels, Step(method.phase(False)), "fp32"
    )
    expected = csq_loss(network(x), csq_centre_of(labels, network.centres), 0.5)
    torch.testing.assert_close(out.loss.total, expected)


def test_its_settings_are_checked():
    assert CSQMethod(method_config("csq")).options == {"lr_scale": 1.0, "quantization_weight": 1e-4}
    with pytest.raises(ValueError, match=r"\['centres'\] are not settings of the csq method"):
        CSQMethod(method_config("csq", options={"centres": 1}))
