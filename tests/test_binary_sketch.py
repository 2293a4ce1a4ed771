"""dpq.methods.binary_sketch: the "sign" method, a binary-hash plug-in trained by the same loop
as DPQ. Its loss against a per-pair loop, training that lowers it, sign codes through a
saved BinaryIndex, mAP on separable blobs far above chance, its checkpoint, its settings."""

import numpy as np
import pytest
import torch

from conftest import QUIET, feature_config, feature_data
from dpq.evaluate.metrics import map_at_r, relevant_share
from dpq.index.binary import BinaryIndex
from dpq.methods import load_network, method_for
from dpq.methods.binary_sketch import ContrastiveHashLoss, SignHashMethod, SignHashNetwork
from dpq.model.network import DPQModel
from dpq.training.loop import train_model


def _per_pair_reference(u, labels, margin, alpha):
    """DSH's loss written pair by pair (labels: class ids or multi-hot rows)."""
    n, total, pairs = len(u), 0.0, 0
    for i in range(n):
        for j in range(i + 1, n):
            if np.ndim(labels[i]) == 0:
                similar = float(labels[i] == labels[j])
            else:
                similar = float(np.dot(labels[i], labels[j]) > 0)
            d = float(np.sum((u[i] - u[j]) ** 2))
            total += 0.5 * similar * d + 0.5 * (1 - similar) * max(margin - d, 0.0)
            pairs += 1
    regulariser = np.mean([np.sum(np.abs(np.abs(row) - 1)) for row in u])
    return total / pairs + alpha * regulariser


def test_the_loss_is_the_per_pair_loop():
    u = np.array(
        [
            [0.9, -0.8, 0.1, 0.5],
            [0.7, -0.9, -0.2, 0.4],
            [-0.9, 0.6, 0.8, -0.3],
            [0.2, 0.1, -0.9, 0.9],
        ],
        dtype=np.float32,
    )
    loss = ContrastiveHashLoss(margin=8.0, alpha=0.1)
    ids = np.array([0, 0, 1, 2])
    out = loss(torch.from_numpy(u), torch.from_numpy(ids))
    assert out.total.item() == pytest.approx(_per_pair_reference(u, ids, 8.0, 0.1), rel=1e-5)
    multi = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    out = loss(torch.from_numpy(u), torch.from_numpy(multi))
    assert out.total.item() == pytest.approx(_per_pair_reference(u, multi, 8.0, 0.1), rel=1e-5)
    assert set(out.parts) == {"pairs", "regulariser", "total"}
    # a dissimilar pair beyond the margin and a similar pair at the same point cost nothing
    far = torch.tensor([[1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]])
    assert loss(far, torch.tensor([0, 0, 1])).total.item() == pytest.approx(0.0, abs=1e-7)


def _config(**train):
    options = {"epochs": 8, "batch_size": 40, "lr": 0.05, **train}
    return feature_config(**options).replace(
        model={"num_classes": 4}, method={"name": "sign", "bits": 16}
    )


def test_the_loop_trains_it_and_its_codes_retrieve_the_blobs(tmp_path):
    data = feature_data(n=400, classes=4, seed=3)
    result = train_model(_config(), data, None, tmp_path / "run", **QUIET)
    totals = [record["total"] for record in result.history]
    assert totals[-1] < 0.1 * totals[0]
    assert {record["phase"] for record in result.history} == {"training"}
    assert "train_accuracy" not in result.history[0]  # no classifier
    network = load_network(tmp_path / "run" / "model")
    assert isinstance(network, SignHashNetwork)
    method = method_for(network.config)
    features = network.extract_features(data.images)
    np.testing.assert_array_equal(features, result.model.extract_features(data.images))

    codes = method.encode(network, features)
    assert codes.dtype == np.uint8 and codes.shape == (400, 2)
    np.testing.assert_array_equal(np.unpackbits(codes, axis=1), features > 0)
    index = method.new_index(network)
    index.add(codes[40:], labels=data.labels[40:])
    _, ranked = method.search(index, features[:40], k=360)
    queries, database = data.labels[:40], data.labels[40:]
    score = map_at_r(ranked, queries, database)
    assert score > 0.9 > 3 * relevant_share(queries, database).mean()  # chance: about 0.25

    path = index.save(tmp_path / "codes.npz")
    loaded = method.load_index(path)
    assert isinstance(loaded, BinaryIndex) and loaded.ntotal == 360
    np.testing.assert_array_equal(method.search(loaded, features[:40], k=360)[1], ranked)
    with pytest.raises(ValueError, match="holds a 'sign' model, not a 'dpq' one"):
        DPQModel.from_checkpoint(tmp_path / "run" / "model")


def test_its_settings_are_checked():
    with pytest.raises(ValueError, match="needs method.bits, a multiple of 8"):
        SignHashMethod(feature_config().replace(method={"name": "sign"}))
    with pytest.raises(ValueError, match="needs method.bits, a multiple of 8"):
        SignHashMethod(feature_config().replace(method={"name": "sign", "bits": 12}))
    with pytest.raises(ValueError, match=r"\['beta'\] are not settings"):
        SignHashMethod(_config().replace(method={"options": {"beta": 2}}))
    with pytest.raises(ValueError, match="margin must be > 0"):
        SignHashMethod(_config().replace(method={"options": {"margin": 0}}))
    with pytest.raises(ValueError, match="mixup_alpha to 0"):
        SignHashMethod(_config(mixup_alpha=0.2))
    method = SignHashMethod(_config().replace(method={"options": {"alpha": 0.5}}))
    assert (method.margin, method.alpha, method.code_lengths()) == (32.0, 0.5, (16,))
    assert not method.uses_word_vectors
    with pytest.raises(ValueError, match="16-bit codes only; got bits=32"):
        method.encode(None, np.zeros((2, 16), np.float32), bits=32)
