"""dpq.methods.dsh: DSH trained by the loop lowers its loss and its sign codes retrieve the
blobs through a saved BinaryIndex; its step loss is dsh_loss on unsquashed outputs; its
settings."""

import numpy as np
import pytest
import torch

from conftest import TrainedMethod, blob_batch, method_config, seeded_network
from dpq.methods.base import Step
from dpq.methods.dsh import DSHMethod, DSHNetwork
from dpq.methods.hashing_losses import dsh_loss


def test_the_loop_trains_it_and_its_codes_retrieve_the_blobs(tmp_path):
    trained = TrainedMethod(method_config("dsh"), tmp_path)
    assert trained.loss_totals[-1] < 0.5 * trained.loss_totals[0]
    assert isinstance(trained.network, DSHNetwork)
    assert trained.codes.dtype == np.uint8 and trained.codes.shape == (400, 2)
    trained.check_sign_codes()
    assert trained.score > 0.9 > 3 * trained.chance  # chance: about 0.25
    trained.search_after_reload(tmp_path)


def test_the_step_loss_is_dsh_loss_on_real_valued_outputs():
    method = DSHMethod(method_config("dsh", options={"margin": 10.0, "alpha": 0.1}))
    network = seeded_network(method)
    with torch.no_grad():
        network.hash_head.weight.mul_(10)  # outputs beyond +-1: nothing squashes them
    x, labels = blob_batch()
    out = method.forward_loss(
        network, method.build_loss(None), x, labels, Step(method.phase(False)), "fp32"
    )
    outputs = network.hash_layer(x)
    assert outputs.abs().max() > 1
    torch.testing.assert_close(out.loss.total, dsh_loss(outputs, labels, margin=10.0, alpha=0.1))
    assert out.logits is None


def test_its_settings_are_checked():
    method = DSHMethod(method_config("dsh", bits=32))
    assert method.options == {
        "lr_scale": 0.1,
        "margin": 64.0,
        "alpha": 0.01,
    }  # the paper's m, alpha
    assert method.code_lengths() == (32,)
    with pytest.raises(ValueError, match="margin must be > 0 for the dsh method"):
        DSHMethod(method_config("dsh", options={"margin": 0}))
    with pytest.raises(ValueError, match=r"\['beta'\] are not settings of the dsh method"):
        DSHMethod(method_config("dsh", options={"beta": 1}))
    with pytest.raises(ValueError, match="the dsh method needs method.bits, a multiple of 8"):
        DSHMethod(method_config("dsh", bits=20))
