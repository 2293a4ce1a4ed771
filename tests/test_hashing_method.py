"""dpq.methods.hashing_method: what the binary-hashing methods share, on a plain method of its
own: the hash layer and its squashing, the loss module, options and guards, sign codes in
np.packbits order, Hamming search through a saved BinaryIndex."""

import numpy as np
import pytest
import torch

from conftest import feature_config, feature_data, seeded_network
from dpq.index.binary import BinaryIndex
from dpq.methods.base import Phase, Step
from dpq.methods.hashing_method import BatchLoss, BinaryHashMethod, HashingNetwork
from dpq.methods.per_length import Option


class _PlainNetwork(HashingNetwork):
    method_name = "plain"


class _RawNetwork(HashingNetwork):
    method_name = "plain"
    squash = False


class _Plain(BinaryHashMethod):
    """Pulls every output towards +1: a loss with a known minimum."""

    name = "plain"
    network_class = _PlainNetwork

    def option_table(self):
        return {"weight": Option(2.0)}

    def build_loss(self, word_vectors):
        weight = self.options["weight"]
        return BatchLoss(lambda outputs, targets: weight * (1 - outputs).pow(2).mean())


def _config(bits=16, **options):
    return feature_config().replace(method={"name": "plain", "bits": bits, "options": options})


def test_the_network_is_a_hash_layer_squashed_or_not():
    torch.manual_seed(0)
    network = _PlainNetwork(_config())
    raw = _RawNetwork(_config())
    raw.load_state_dict(network.state_dict())
    x = torch.from_numpy(feature_data().images[:5])
    z = network.hash_layer(x)
    head = network.hash_head  # N(0, 0.01) weights, zero bias: the authors' new layer
    assert head.bias.abs().sum() == 0 and 0.005 < float(head.weight.detach().std()) < 0.02
    assert z.shape == (5, 16) and network.feature_dim == 16 and network.logits_dim == 0
    torch.testing.assert_close(network(x), torch.tanh(z))
    torch.testing.assert_close(raw(x), z)
    features, logits = network.searched_features(x, tta_flip=True)  # features: no mirror
    torch.testing.assert_close(features, torch.tanh(z))
    assert logits.shape == (5, 0)
    with pytest.raises(ValueError, match="the plain method needs method.bits, a multiple of 8"):
        _PlainNetwork(_config(bits=12))


def test_the_step_loss_reads_the_outputs_and_options_are_checked():
    method = _Plain(_config(weight=0.5, lr_scale=0.25))
    assert method.options == {"lr_scale": 0.25, "weight": 0.5}
    assert method.network_lr_scale() == 0.25 and method.code_lengths() == (16,)
    network = seeded_network(method)
    x = torch.from_numpy(feature_data().images[:6])
    out = method.forward_loss(
        network, method.build_loss(None), x, torch.zeros(6, dtype=torch.int64),
        Step(Phase("training")), "fp32",
    )  # fmt: skip
    expected = 0.5 * (1 - network(x)).pow(2).mean()
    torch.testing.assert_close(out.loss.total, expected)
    assert out.logits is None and out.loss.parts == {
        "total": pytest.approx(float(expected.detach()))
    }
    with pytest.raises(ValueError, match=r"\['beta'\] are not settings of the plain method"):
        _Plain(_config(beta=1))
    with pytest.raises(ValueError, match="lr_scale must be > 0 for the plain method"):
        _Plain(_config(lr_scale=0))
    with pytest.raises(ValueError, match="needs each item's own labels: set train.mixup_alpha"):
        _Plain(_config().replace(train={"mixup_alpha": 0.2}))


def test_codes_are_signs_in_packbits_order_and_search_by_hamming_distance(tmp_path):
    method = _Plain(_config(bits=8))
    features = np.array(
        [[1, -1, 1, -1, 1, -1, 1, -1], [-1, -1, -1, -1, -1, -1, -1, 0.5], [1] * 8],
        dtype=np.float32,
    )
    codes = method.encode(None, features)
    np.testing.assert_array_equal(codes, [[0b10101010], [0b00000001], [0b11111111]])
    index = method.new_index(None, metadata={"method": "plain"})
    assert isinstance(index, BinaryIndex) and index.bits == 8
    index.add(codes)
    distances, ids = method.search(index, features[:1] * 0.1, k=3)
    np.testing.assert_array_equal(ids, [[0, 2, 1]])
    np.testing.assert_array_equal(distances, [[0, 4, 5]])
    loaded = method.load_index(index.save(tmp_path / "codes.npz"))
    np.testing.assert_array_equal(method.search(loaded, features[:1], k=3)[1], ids)
    with pytest.raises(ValueError, match="8-bit codes only; got bits=16"):
        method.search(index, features, k=1, bits=16)
    with pytest.raises(ValueError, match=r"features must be float \(N, 8\)"):
        method.encode(None, features[:, :4])
