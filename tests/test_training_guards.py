"""dpq.training.guards: the training-data checks and the divergence stops with their advice,
on a tiny DPQ network over feature inputs (no training run)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import feature_config, feature_data
from dpq.methods import method_for
from dpq.model.network import DPQModel
from dpq.training.guards import DivergenceGuard, TrainingDiverged, check_training_data


def _check(config, inputs, labels, world=1):
    check_training_data(inputs, labels, DPQModel(config), config, method_for(config), world)


def test_training_data_is_checked_with_one_sentence_each():
    config = feature_config()
    data = feature_data()
    _check(config, data.images, data.labels)  # fine as it is
    with pytest.raises(ValueError, match="120 inputs but 119 labels"):
        _check(config, data.images, data.labels[:-1])
    broken = data.images.copy()
    broken[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        _check(config, broken, data.labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        _check(config, data.images, data.labels + 1)
    with pytest.raises(ValueError, match="holds 2 classes but the model"):
        _check(config, data.images, data.labels % 2)
    with pytest.raises(ValueError, match="needs int class ids"):
        _check(config, data.images, data.labels.astype(np.float32))
    with pytest.raises(ValueError, match="k-means initialisation needs at least K = 8"):
        _check(config, data.images[:6], data.labels[:6])
    with pytest.raises(ValueError, match="does not split evenly across 3 processes"):
        _check(config, data.images, data.labels, world=3)
    multi = config.replace(model={"multilabel": True})
    with pytest.raises(ValueError, match=r"multi-hot labels \(N, 3\)"):
        _check(multi, data.images, data.labels)


def _guard(precision="fp32", last=None):
    return DivergenceGuard(method_for(feature_config()), precision, lambda: last)


def test_a_non_finite_loss_names_the_step_the_terms_and_the_advice():
    parts = {"total": math.nan, "cls": 1.0, "E": math.inf}
    with pytest.raises(TrainingDiverged) as raised:
        _guard("bf16", Path("run/checkpoints/epoch-0002")).check_loss(parts, 1, 4, 0.5)
    message = str(raised.value)
    assert "loss became nan at epoch 2, step 5 (non-finite terms: total, E)" in message
    assert "(network lr 0.5, codebook lr 0.0001)" in message
    assert "train in fp32 (--precision fp32; this run used bf16)" in message
    assert "try a smaller --tau" in message
    assert "the last good checkpoint is run/checkpoints/epoch-0002" in message
    _guard().check_loss({"total": 1.0}, 0, 0, 0.1)  # finite: nothing happens
    advice = _guard().advice(0.1, ["cls"])
    assert "--tau" not in advice and "no checkpoint was written yet" in advice


def test_non_finite_weights_are_refused():
    model = DPQModel(feature_config())
    guard = _guard()
    guard.check_weights(model, 0, 0.1)
    with torch.no_grad():
        model.semantic_head.weight[0, 0] = math.inf
    with pytest.raises(TrainingDiverged, match=r"during epoch 3 \(e.g. semantic_head.weight\)"):
        guard.check_weights(model, 2, 0.1)
