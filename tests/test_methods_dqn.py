"""dpq.methods.dqn: DQN trained by the loop lowers its loss and keeps its product codebooks
block-structured; its subspace codes retrieve the blobs by AQD through a saved DPQIndex; its
step loss is the pairwise cosine loss plus the product quantization loss; its settings."""

import numpy as np
import pytest
import torch

from conftest import TrainedMethod, blob_batch, method_config, seeded_network
from dpq.methods.base import Step
from dpq.methods.dqn import DQNMethod, DQNNetwork
from dpq.methods.quantization_losses import (
    dqn_cosine_loss,
    pq_encode,
    product_quantization_loss,
)


def test_the_loop_trains_it_and_its_codes_retrieve_the_blobs(tmp_path):
    trained = TrainedMethod(method_config("dqn"), tmp_path)
    history = trained.result.history
    assert [r["phase"] for r in history] == ["features"] + ["quantization"] * 7
    assert trained.loss_totals[-1] < 0.85 * trained.loss_totals[0]  # its minimum is ~0.33 here
    assert isinstance(trained.network, DQNNetwork)
    books = trained.network.codebook_array()
    assert (books[0][:, 3:] == 0).all() and (books[1][:, :3] == 0).all()  # one block each
    np.testing.assert_array_equal(trained.codes, pq_encode(trained.features, books))
    assert trained.index.search_mode == "aqd"
    assert trained.score > 0.9 > 3 * trained.chance
    distances = trained.search_after_reload(tmp_path)
    reconstruction = books[np.arange(2), trained.codes[40:].astype(np.int64)].sum(axis=1)
    squared = ((trained.features[:40, None] - reconstruction[None]) ** 2).sum(axis=2)
    np.testing.assert_allclose(distances, np.sort(squared, axis=1), rtol=1e-4, atol=1e-4)


def test_the_step_loss_is_the_cosine_loss_plus_the_product_quantization_loss():
    method = DQNMethod(method_config("dqn", options={"quantization_weight": 0.5}))
    network = seeded_network(method)
    loss = method.build_loss(None)
    x, labels = blob_batch()
    features = network(x)
    first = method.forward_loss(network, loss, x, labels, Step(method.phase(False)), "fp32")
    torch.testing.assert_close(first.loss.total, dqn_cosine_loss(features, labels))
    second = method.forward_loss(network, loss, x, labels, Step(method.phase(True)), "fp32")
    books = network.codebook_tensor()
    codes = torch.from_numpy(pq_encode(features.detach(), books.detach()))
    expected = dqn_cosine_loss(features, labels) + 0.5 * product_quantization_loss(
        features, books, codes
    )
    torch.testing.assert_close(second.loss.total, expected)
    second.loss.total.backward()
    grad = network.codebooks.grad
    assert grad[0, :, 3:].abs().sum() == 0 and grad[0, :, :3].abs().sum() > 0  # its block only


def test_its_settings_are_checked():
    method = DQNMethod(method_config("dqn", bits=32))
    assert method.options == {"lr_scale": 1.0, "warmup_epochs": 1, "quantization_weight": 1e-4}
    assert method.num_codebooks == 4 and method.code_lengths() == (32,)
    with pytest.raises(ValueError, match="pairs need each item's own labels"):
        DQNMethod(method_config("dqn", mixup_alpha=0.2))
    with pytest.raises(ValueError, match=r"\['subspaces'\] are not settings of the dqn method"):
        DQNMethod(method_config("dqn", options={"subspaces": 2}))
