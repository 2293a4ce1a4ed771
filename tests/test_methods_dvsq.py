"""dpq.methods.dvsq: DVSQ trained by the loop lowers its loss and keeps its word vectors; its
ICM codes in the word-vector metric retrieve the blobs by inner product through a saved
DPQIndex; its step loss is the adaptive margin loss plus the inner-product quantization loss;
its settings and guards."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TrainedMethod, blob_batch, method_config, orthogonal, seeded_network
from dpq.methods.base import Step
from dpq.methods.dvsq import DVSQLoss, DVSQMethod, DVSQNetwork
from dpq.methods.losses import semantic_loss
from dpq.methods.quantization_losses import icm_encode, inner_product_quantization_loss

WORD_VECTORS = orthogonal(4, 6)


def test_the_loop_trains_it_and_its_codes_retrieve_the_blobs(tmp_path):
    trained = TrainedMethod(method_config("dvsq"), tmp_path, WORD_VECTORS)
    history = trained.result.history
    assert [r["phase"] for r in history] == ["features"] + ["quantization"] * 7
    assert "quantization" in history[-1] and "quantization" not in history[0]
    assert trained.loss_totals[-1] < 0.7 * trained.loss_totals[0]
    network = trained.network
    assert isinstance(network, DVSQNetwork)
    np.testing.assert_array_equal(network.word_vectors.numpy(), WORD_VECTORS)  # saved with it
    books = network.codebook_array()
    # block k-means start, then composite: codewords that were used left their blocks
    assert (books[0][:, 3:] != 0).any() and (books[1][:, :3] != 0).any()
    expected = icm_encode(trained.features, books, WORD_VECTORS, iterations=3)
    np.testing.assert_array_equal(trained.codes, expected)
    assert trained.codes.dtype == np.uint8 and trained.codes.shape == (400, 2)
    assert trained.index.search_mode == "ip"
    assert trained.score > 0.9 > 3 * trained.chance
    distances = trained.search_after_reload(tmp_path)
    reconstruction = books[np.arange(2), expected[40:]].sum(axis=1)
    inner = trained.features[:40] @ reconstruction.T
    np.testing.assert_allclose(distances, -np.sort(inner, axis=1)[:, ::-1], rtol=1e-4, atol=1e-5)


def test_the_step_loss_is_the_margin_loss_plus_the_inner_product_quantization_loss():
    method = DVSQMethod(method_config("dvsq", options={"quantization_weight": 0.5}))
    network = seeded_network(method)
    loss = method.build_loss(WORD_VECTORS)
    x, labels = blob_batch()
    words = torch.from_numpy(WORD_VECTORS)
    features = network(x)
    margin = semantic_loss(features, F.one_hot(labels, 4).float(), words) / 4
    first = method.forward_loss(network, loss, x, labels, Step(method.phase(False)), "fp32")
    torch.testing.assert_close(first.loss.total, margin)
    assert set(first.loss.parts) == {"semantic", "total"} and first.logits is None
    np.testing.assert_array_equal(network.word_vectors.numpy(), WORD_VECTORS)
    second = method.forward_loss(network, loss, x, labels, Step(method.phase(True)), "fp32")
    codes = torch.from_numpy(icm_encode(features.detach(), network.codebook_array(), words, 3))
    books = network.codebook_tensor()
    expected = margin + 0.5 * inner_product_quantization_loss(features, books, codes, words)
    torch.testing.assert_close(second.loss.total, expected)
    multi_hot = F.one_hot(labels, 4).float()
    multi_hot[0, 1] = 1.0
    multi = loss(features, multi_hot)
    torch.testing.assert_close(multi.total, semantic_loss(features, multi_hot, words) / 4)


def test_its_settings_and_guards():
    method = DVSQMethod(method_config("dvsq"))
    assert method.options == {"lr_scale": 1.0, "warmup_epochs": 1, "quantization_weight": 1e-4}
    assert method.search_mode == "ip" and method.code_lengths() == (16,)
    with pytest.raises(ValueError, match="the dvsq method needs label word vectors"):
        method.build_loss(None)
    with pytest.raises(ValueError, match="the word vectors have 3 rows but the data has 4"):
        method.build_loss(WORD_VECTORS[:3])
    network = method.build_network()
    features = np.zeros((2, 6), dtype=np.float32)
    with pytest.raises(ValueError, match="holds no label word vectors \\(it has not been trained"):
        method.encode(network, features)
    with pytest.raises(TypeError, match="needs its DVSQLoss"):
        method.forward_loss(network, torch.nn.Identity(), None, None, None, "fp32")
    assert isinstance(method.build_loss(WORD_VECTORS), DVSQLoss)
