"""dpq.training.batches: each epoch's order (the same for every reader and on every rank's
share), the targets, and the prepared (augmented) inputs, on tiny data."""

import numpy as np
import pytest
import torch

from conftest import digits_config, feature_config, feature_data
from dpq.model.network import DPQModel
from dpq.training.batches import ArrayDataset, EpochBatches
from dpq.training.ddp import DistributedContext


def _batches(config, labels, dist=None):
    torch.manual_seed(0)
    return EpochBatches(labels, config, DPQModel(config), dist)


def test_an_epoch_is_a_seeded_permutation_cut_into_full_batches():
    labels = feature_data(n=130).labels
    batches = _batches(feature_config(batch_size=40), labels)
    assert batches.steps_per_epoch() == 3
    order, _ = batches.order(0)
    assert order.shape == (3, 40) and len(np.unique(order)) == 120
    again, _ = _batches(feature_config(batch_size=40), labels).order(0)
    np.testing.assert_array_equal(order, again)
    assert not np.array_equal(order, batches.order(1)[0])
    assert _batches(feature_config(batch_size=500), labels).order(0)[0].shape == (1, 130)


def test_each_rank_takes_every_other_item_of_the_same_global_batches():
    labels = feature_data().labels
    config = feature_config(batch_size=40)
    whole, whole_rng = _batches(config, labels).order(2)
    share, rng = _batches(config, labels, DistributedContext(rank=1, world_size=2)).order(2)
    np.testing.assert_array_equal(share, whole[:, 1::2])
    assert rng.random() != whole_rng.random()  # augmentations of its own


def test_prepared_inputs_and_targets(digits):
    features = feature_data()
    plain = _batches(feature_config(), features.labels)
    index = np.arange(5)
    x, targets = plain.prepare(
        torch.from_numpy(features.images[index]), index, np.random.default_rng(0), augment=True
    )
    torch.testing.assert_close(x, torch.from_numpy(features.images[:5]))  # features: as given
    assert targets.dtype == torch.int64 and targets.tolist() == features.labels[:5].tolist()

    images = _batches(digits_config(crop_pad=1, flip=True, cutout=2), digits.labels)
    raw = torch.from_numpy(digits.images[:6])
    first = images.prepare(raw, np.arange(6), np.random.default_rng(3), augment=True)[0]
    second = images.prepare(raw, np.arange(6), np.random.default_rng(3), augment=True)[0]
    unaugmented = images.prepare(raw, np.arange(6), np.random.default_rng(3), augment=False)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # the generator decides
    assert first.shape == (6, 3, 8, 8) and not torch.equal(first, unaugmented)

    mixed = _batches(digits_config(mixup_alpha=0.4), digits.labels)
    _, soft = mixed.prepare(raw, np.arange(6), np.random.default_rng(0), augment=True)
    assert soft.shape == (6, 10) and torch.allclose(soft.sum(1), torch.ones(6))


def test_multi_hot_labels_become_float_targets():
    labels = np.eye(3, dtype=np.uint8)[feature_data().labels]
    config = feature_config().replace(model={"multilabel": True})
    targets = _batches(config, labels).targets(np.array([0, 1]))
    assert targets.dtype == torch.float32 and targets.tolist() == labels[:2].tolist()
    with pytest.raises(AttributeError):
        ArrayDataset(labels, labels).labels = labels  # frozen
