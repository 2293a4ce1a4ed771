"""Each vectorised loss against a slow per-example loop; DPQLoss composition and checks."""

import math

import numpy as np
import pytest
import torch

from dpq.config import LossConfig
from dpq.methods.losses import (
    DPQLoss,
    adaptive_margins,
    classification_loss,
    quantization_losses,
    semantic_loss,
)
from dpq.model.quantizer import QuantizerOutput

N, C, D, L = 7, 5, 6, 3


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return {
        "features": torch.randn(N, D, generator=g),
        "logits": torch.randn(N, C, generator=g),
        "labels": torch.tensor([0, 1, 2, 3, 4, 0, 2]),
        "multi_hot": (torch.rand(N, C, generator=g) < 0.4).float(),
        "word_vectors": torch.randn(C, D, generator=g),
        "soft": torch.randn(N, L, D, generator=g),
        "hard": torch.randn(N, L, D, generator=g),
    }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def loop_semantic(features, positives, word_vectors, margin=None, reduction="sum") -> float:
    """Per example: sum (or mean) over (positive i, negative j) of max(0, delta_ij -
    cos(v, z_i) + cos(v, z_j)) weighted by positives[n, i]; then the mean over examples."""
    v, p, z = features.numpy(), positives.numpy(), word_vectors.numpy()
    total = 0.0
    for n in range(len(v)):
        num = den = 0.0
        for i in range(z.shape[0]):
            if p[n, i] == 0:
                continue
            for j in range(z.shape[0]):
                if p[n, j] != 0:
                    continue
                delta = 1.0 - cosine(z[i], z[j]) if margin is None else margin
                hinge = max(0.0, delta - cosine(v[n], z[i]) + cosine(v[n], z[j]))
                num += p[n, i] * hinge
                den += p[n, i]
        if reduction == "sum":
            total += num
        else:
            total += num / den if den > 0 else 0.0
    return total / len(v)


def test_semantic_loss_single_label_matches_loop(data):
    positives = torch.nn.functional.one_hot(data["labels"], C).float()
    got = semantic_loss(data["features"], positives, data["word_vectors"])
    assert float(got) == pytest.approx(
        loop_semantic(data["features"], positives, data["word_vectors"]), rel=1e-5
    )


def test_semantic_loss_multi_hot_and_fixed_margin_match_loop(data):
    positives = data["multi_hot"]
    got = semantic_loss(data["features"], positives, data["word_vectors"], margin=0.3)
    want = loop_semantic(data["features"], positives, data["word_vectors"], margin=0.3)
    assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_semantic_loss_reductions_match_loop(data, reduction):
    positives = data["multi_hot"]
    got = semantic_loss(data["features"], positives, data["word_vectors"], reduction=reduction)
    want = loop_semantic(data["features"], positives, data["word_vectors"], reduction=reduction)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_semantic_loss_sum_is_the_mean_times_the_number_of_negatives(data):
    positives = torch.nn.functional.one_hot(data["labels"], C).float()
    total = semantic_loss(data["features"], positives, data["word_vectors"], reduction="sum")
    mean = semantic_loss(data["features"], positives, data["word_vectors"], reduction="mean")
    assert float(total) == pytest.approx(float(mean) * (C - 1), rel=1e-5)


def test_semantic_loss_weighted_positives_match_loop(data):
    mixed = torch.zeros(N, C)
    mixed[torch.arange(N), data["labels"]] = 0.7
    mixed[torch.arange(N), (data["labels"] + 1) % C] += 0.3
    got = semantic_loss(data["features"], mixed, data["word_vectors"])
    assert float(got) == pytest.approx(
        loop_semantic(data["features"], mixed, data["word_vectors"]), rel=1e-5
    )


def test_semantic_loss_is_zero_when_features_sit_on_their_word_vector(data):
    z = data["word_vectors"]
    features = z[data["labels"]] * 3.0  # cos(v, z_i) = 1 beats every margin 1 - cos(z_i, z_j)
    positives = torch.nn.functional.one_hot(data["labels"], C).float()
    assert float(semantic_loss(features, positives, z)) == pytest.approx(0.0, abs=1e-6)


def test_adaptive_margins(data):
    z = data["word_vectors"].numpy()
    delta = adaptive_margins(data["word_vectors"]).numpy()
    for i in range(C):
        for j in range(C):
            assert delta[i, j] == pytest.approx(1 - cosine(z[i], z[j]), abs=1e-6)


def test_classification_loss_matches_loop(data):
    logits, labels = data["logits"], data["labels"]
    for smoothing in (0.0, 0.1):
        want = 0.0
        for n in range(N):
            log_p = torch.log_softmax(logits[n], 0).numpy()
            target = np.full(C, smoothing / C)
            target[labels[n]] += 1 - smoothing
            want -= float(target @ log_p)
        got = classification_loss(logits, labels, label_smoothing=smoothing)
        assert float(got) == pytest.approx(want / N, rel=1e-5)
        probs = torch.nn.functional.one_hot(labels, C).float()
        soft = classification_loss(logits, probs, label_smoothing=smoothing)
        assert float(soft) == pytest.approx(want / N, rel=1e-5)


def test_multilabel_classification_matches_loop(data):
    logits, y = data["logits"].numpy(), data["multi_hot"].numpy()
    want = 0.0
    for n in range(N):
        for c in range(C):
            p = 1 / (1 + math.exp(-logits[n, c]))
            want -= y[n, c] * math.log(p) + (1 - y[n, c]) * math.log(1 - p)
    got = classification_loss(data["logits"], data["multi_hot"], multilabel=True)
    assert float(got) == pytest.approx(want / (N * C), rel=1e-5)


def test_quantization_losses_match_loop(data):
    x, soft, hard = data["features"], data["soft"], data["hard"]
    weights = torch.tensor([0.5, 1.0, 2.0])
    terms = quantization_losses(x, soft, hard, weights)
    want = {"quan": 0.0, "quan_hard": 0.0, "match": 0.0}
    for n in range(N):
        for level in range(L):
            w = float(weights[level])
            soft_sum = soft[n, : level + 1].sum(0)
            hard_sum = hard[n, : level + 1].sum(0)
            want["quan"] += w * float(((x[n] - soft_sum) ** 2).sum())
            want["quan_hard"] += w * float(((x[n] - hard_sum) ** 2).sum())
            want["match"] += w * float(((soft[n, level] - hard[n, level]) ** 2).sum())
    for name, value in want.items():
        assert float(getattr(terms, name)) == pytest.approx(value / N, rel=1e-5)


def make_loss(config: LossConfig, word_vectors) -> DPQLoss:
    return DPQLoss(config, word_vectors, num_classes=C, num_levels=L, dim=D)


def test_dpq_loss_is_the_weighted_sum_of_its_terms(data):
    config = LossConfig(lambda_cls=0.3, tau=0.5, mu=2.0, nu=0.25, level_weights=(1.0, 0.5, 0.25))
    loss = make_loss(config, data["word_vectors"])
    quantized = QuantizerOutput(data["soft"], data["hard"], torch.zeros(N, L, dtype=torch.long))
    out = loss(data["features"], data["logits"], data["labels"], quantized)
    p = out.parts
    energy = p["quan"] + 2.0 * p["quan_hard"] + 0.25 * p["match"]
    assert p["E"] == pytest.approx(energy, rel=1e-5)
    assert out.parts["total"] == pytest.approx(
        p["semantic"] + 0.3 * p["cls"] + 0.5 * energy, rel=1e-5
    )
    assert float(out.total) == pytest.approx(p["total"])
    without_e = loss(data["features"], data["logits"], data["labels"], None)
    assert set(without_e.parts) == {"semantic", "cls", "total"}


def test_switched_off_terms_are_absent(data):
    config = LossConfig(use_semantic=False, use_soft=False, use_match=False)
    loss = make_loss(config, None)
    quantized = QuantizerOutput(data["soft"], data["hard"], torch.zeros(N, L, dtype=torch.long))
    out = loss(data["features"], data["logits"], data["labels"], quantized)
    assert set(out.parts) == {"cls", "quan_hard", "E", "total"}


def test_detached_quantizer_input_keeps_e_away_from_features(data):
    config = LossConfig(use_semantic=False, use_cls=False)
    loss = make_loss(config, None)
    features = data["features"].clone().requires_grad_(True)
    codebook_like = data["soft"].clone().requires_grad_(True)
    quantized = QuantizerOutput(codebook_like, codebook_like * 1.0, torch.zeros(N, L).long())
    out = loss(features, data["logits"], data["labels"], quantized, features.detach())
    out.total.backward()
    assert features.grad is None
    assert codebook_like.grad is not None and codebook_like.grad.abs().sum() > 0


def test_word_vector_checks(data):
    with pytest.raises(ValueError, match="needs label word vectors"):
        make_loss(LossConfig(), None)
    with pytest.raises(ValueError, match="rows but the data has 5 classes"):
        make_loss(LossConfig(), torch.randn(C + 3, D))
    with pytest.raises(ValueError, match="semantic features are 6-d"):
        make_loss(LossConfig(), torch.randn(C, D + 1))
    with pytest.raises(ValueError, match="all zeros"):
        make_loss(LossConfig(), torch.zeros(C, D))


def test_shape_checks(data):
    with pytest.raises(ValueError, match="share D"):
        semantic_loss(data["features"], data["multi_hot"], torch.randn(C, D + 1))
    with pytest.raises(ValueError, match="multi-label targets"):
        classification_loss(data["logits"], torch.zeros(N, C + 1), multilabel=True)
    with pytest.raises(ValueError, match="shape"):
        quantization_losses(data["features"], data["soft"], data["hard"][:, :2])
