"""dpq.methods.quantization_method: what the deep quantization methods share, on a plain
method of its own: the head and codebooks (full or block-structured), the two phases and
their step losses, the block k-means initialisation, the guards, codes and a DPQIndex."""

import numpy as np
import pytest
import torch

from conftest import feature_config, feature_data
from dpq.index import DPQIndex
from dpq.methods.base import LossOutput, Step
from dpq.methods.quantization_losses import pq_codebooks_by_kmeans, pq_encode
from dpq.methods.quantization_method import (
    CODEBOOK_SIZE,
    CodebookMethod,
    QuantizationNetwork,
    subspace_blocks,
)


class _FullNetwork(QuantizationNetwork):
    method_name = "plainq"


class _BlockNetwork(QuantizationNetwork):
    method_name = "plainq"
    block_codebooks = True


class _Recorder(torch.nn.Module):
    """A loss that keeps what it was given."""

    def forward(self, features, targets, codebooks, codes):
        self.seen = (features, codebooks, codes)
        total = features.pow(2).mean()
        return LossOutput(total, {"total": float(total.detach())})


class _PlainQ(CodebookMethod):
    name = "plainq"
    network_class = _BlockNetwork

    def build_loss(self, word_vectors):
        return _Recorder()

    def assign(self, network, features):
        return pq_encode(features, network.codebook_array())


def _config(bits=16, **options):
    return feature_config().replace(method={"name": "plainq", "bits": bits, "options": options})


def test_full_and_block_codebooks_and_the_head():
    torch.manual_seed(0)
    full, block = _FullNetwork(_config(bits=24)), _BlockNetwork(_config(bits=24))
    assert full.codebooks.shape == (3, CODEBOOK_SIZE, 6) and full.num_codebooks == 3
    assert full.codebooks.abs().max() <= 1  # uniform in [-1, 1], as the authors' code
    torch.testing.assert_close(full.codebook_tensor(), full.codebooks)
    books = block.codebook_array()
    assert [b.tolist() for b in subspace_blocks(6, 3)] == [[0, 1], [2, 3], [4, 5]]
    for m, kept in enumerate(subspace_blocks(6, 3)):
        outside = np.setdiff1d(np.arange(6), kept)
        assert (books[m][:, outside] == 0).all() and (books[m][:, kept] != 0).all()
    assert "codebook_mask" not in block.state_dict()  # derived from the config, not saved
    x = torch.from_numpy(feature_data().images[:4])
    assert full(x).shape == (4, 6) and full(x).abs().max() < 1 and full.logits_dim == 0
    with pytest.raises(ValueError, match="16 bits need M = 2 codebooks, more than the D = 1"):
        _FullNetwork(_config(bits=16).replace(quantizer={"dim": 1}))


def test_phases_and_the_step_loss_of_each():
    method = _PlainQ(_config(warmup_epochs=2))
    assert [method.second_phase_start(e) for e in (1, 2, 3, 8)] == [0, 1, 2, 2]
    first, second = method.phase(False), method.phase(True)
    assert first.trains_network and not first.trains_codebooks and first.init_codebooks is None
    assert second.trains_codebooks and second.init_codebooks == "as_trained"
    assert method.has_second_phase and method.timed_phase() == second
    torch.manual_seed(0)
    network = method.build_network()
    loss = method.build_loss(None)
    data = feature_data()
    x, targets = torch.from_numpy(data.images[:10]), torch.from_numpy(data.labels[:10])
    method.forward_loss(network, loss, x, targets, Step(first), "fp32")
    assert loss.seen[1] is None and loss.seen[2] is None
    method.forward_loss(network, loss, x, targets, Step(second), "fp32")
    features, codebooks, codes = loss.seen
    assert codebooks.requires_grad and codes.dtype == torch.int64
    np.testing.assert_array_equal(codes.numpy(), pq_encode(features.detach(), codebooks.detach()))


def test_block_kmeans_init_guards_and_settings():
    method = _PlainQ(_config())
    assert method.options == {"lr_scale": 1.0, "warmup_epochs": 1}
    assert method.learning_rates() == {"codebook": 1e-4}
    network = method.build_network()
    assert list(method.codebook_parameters(network)) == ["codebooks"]
    features = feature_data(n=300).images[:, :6]
    errors = method.init_codebooks(network, features)
    expected = pq_codebooks_by_kmeans(features, 2, CODEBOOK_SIZE, seed=0, iterations=20)
    np.testing.assert_array_equal(network.codebook_array(), expected)
    assert len(errors) == 2 and all(0 <= e < 1 for e in errors)
    assert "per block" in method.describe_init(300, errors)
    with pytest.raises(ValueError, match="needs at least K = 256 training items; got 255"):
        method.check_training_set(255)
    with pytest.raises(
        ValueError, match="warmup_epochs must be a whole number for the plainq method"
    ):
        _PlainQ(_config(warmup_epochs=0.5))


def test_codes_go_through_a_saved_dpq_index(tmp_path):
    method = _PlainQ(_config())
    torch.manual_seed(0)
    network = method.build_network()
    data = feature_data(n=300)
    features = network.extract_features(data.images)
    method.init_codebooks(network, features)
    codes = method.encode(network, features)
    assert codes.dtype == np.uint8 and codes.shape == (300, 2)
    np.testing.assert_array_equal(codes, pq_encode(features, network.codebook_array()))
    index = method.new_index(network)
    assert isinstance(index, DPQIndex) and index.search_mode == "aqd"
    np.testing.assert_array_equal(index.codebooks, network.codebook_array())
    index.add(codes)
    distances, ids = method.search(index, features[:5], k=10)
    reconstruction = network.codebook_array()[np.arange(2), codes.astype(np.int64)].sum(axis=1)
    exact = ((features[:5, None, :] - reconstruction[None]) ** 2).sum(axis=2)
    np.testing.assert_allclose(distances, np.sort(exact, axis=1)[:, :10], rtol=1e-4, atol=1e-4)
    loaded = method.load_index(index.save(tmp_path / "index.npz"))
    np.testing.assert_array_equal(method.search(loaded, features[:5], k=10)[1], ids)
    with pytest.raises(ValueError, match="16-bit codes only; got bits=8"):
        method.encode(network, features, bits=8)
    with pytest.raises(ValueError, match=r"features must be float \(N, 6\)"):
        method.encode(network, features[:, :4])
