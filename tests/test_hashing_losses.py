"""The hashing competitors' losses against per-pair loops, their gradients, and short trainings
of a linear model on Gaussian blobs whose sign codes must retrieve same-class items."""

import math

import numpy as np
import pytest
import torch

from dpq.evaluate.metrics import map_at_r, rank_by_distance, relevant_share
from dpq.methods.hashing_losses import (
    csq_centre_of,
    csq_loss,
    dhn_loss,
    dsh_loss,
    hadamard_centres,
    hashnet_beta,
    hashnet_loss,
    pair_similarity,
)

B, BITS, C = 6, 5, 4
SINGLE = torch.tensor([0, 1, 0, 2, 1, 3])
MULTI = torch.tensor(
    [[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 1, 0]],
    dtype=torch.float32,
)


def similar(labels: torch.Tensor, i: int, j: int) -> bool:
    if labels.ndim == 1:
        return int(labels[i]) == int(labels[j])
    return any(labels[i, c] > 0 and labels[j, c] > 0 for c in range(labels.shape[1]))


def ordered_pairs(n: int):
    return [(i, j) for i in range(n) for j in range(n) if i != j]


def outputs(seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(B, BITS, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 1.5


def loop_dsh(b: torch.Tensor, labels, margin: float, alpha: float) -> float:
    total = 0.0
    pairs = ordered_pairs(b.shape[0])
    for i, j in pairs:
        y = 0.0 if similar(labels, i, j) else 1.0
        distance = sum((float(b[i, k]) - float(b[j, k])) ** 2 for k in range(b.shape[1]))
        regulariser = sum(abs(abs(float(b[n, k])) - 1) for n in (i, j) for k in range(b.shape[1]))
        total += 0.5 * (1 - y) * distance + 0.5 * y * max(margin - distance, 0.0)
        total += alpha * regulariser
    return total / len(pairs)


def loop_dhn(z: torch.Tensor, labels, weight: float, alpha: float) -> float:
    pairs = ordered_pairs(z.shape[0])
    likelihood = 0.0
    for i, j in pairs:
        theta = alpha * sum(float(z[i, k]) * float(z[j, k]) for k in range(z.shape[1]))
        s = 1.0 if similar(labels, i, j) else 0.0
        likelihood += math.log1p(math.exp(theta)) - s * theta
    entries = [float(v) for v in z.flatten()]
    quantization = sum(math.log(math.cosh(abs(v) - 1)) for v in entries) / len(entries)
    return likelihood / len(pairs) + weight * quantization


def loop_hashnet(h: torch.Tensor, labels, alpha: float) -> float:
    pairs = ordered_pairs(h.shape[0])
    s1 = sum(similar(labels, i, j) for i, j in pairs)
    s0 = len(pairs) - s1
    total = 0.0
    for i, j in pairs:
        theta = alpha * sum(float(h[i, k]) * float(h[j, k]) for k in range(h.shape[1]))
        s = 1.0 if similar(labels, i, j) else 0.0
        weight = len(pairs) / s1 if s else len(pairs) / s0
        total += weight * (math.log1p(math.exp(theta)) - s * theta)
    return total / len(pairs)


@pytest.mark.parametrize("labels", [SINGLE, MULTI], ids=["single", "multi"])
def test_pair_similarity_matches_loop(labels):
    got = pair_similarity(labels)
    assert got.dtype == torch.bool and got.shape == (B, B)
    for i in range(B):
        for j in range(B):
            assert bool(got[i, j]) == similar(labels, i, j)


def test_pair_similarity_rejects_float_class_ids_and_3d():
    with pytest.raises(TypeError, match="integer class ids"):
        pair_similarity(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="multi-hot"):
        pair_similarity(torch.zeros(2, 2, 2))


@pytest.mark.parametrize("labels", [SINGLE, MULTI], ids=["single", "multi"])
def test_dsh_loss_matches_per_pair_loop(labels):
    b = outputs()
    assert float(dsh_loss(b, labels)) == pytest.approx(loop_dsh(b, labels, 2 * BITS, 0.01), 1e-6)
    got = float(dsh_loss(b, labels, margin=3.0, alpha=0.2))
    assert got == pytest.approx(loop_dsh(b, labels, 3.0, 0.2), rel=1e-6)


@pytest.mark.parametrize("labels", [SINGLE, MULTI], ids=["single", "multi"])
def test_dhn_loss_matches_per_pair_loop(labels):
    z = outputs(1)
    assert float(dhn_loss(z, labels, 0.3)) == pytest.approx(loop_dhn(z, labels, 0.3, 0.5), 1e-6)
    got = float(dhn_loss(z, labels, 0.0, alpha=1.0))
    assert got == pytest.approx(loop_dhn(z, labels, 0.0, 1.0), rel=1e-6)


@pytest.mark.parametrize("labels", [SINGLE, MULTI], ids=["single", "multi"])
def test_hashnet_loss_matches_weighted_loop(labels):
    h = torch.tanh(outputs(2))
    assert float(hashnet_loss(h, labels)) == pytest.approx(
        loop_hashnet(h, labels, 10.0 / BITS), rel=1e-6
    )
    assert float(hashnet_loss(h, labels, 0.7)) == pytest.approx(
        loop_hashnet(h, labels, 0.7), rel=1e-6
    )


def test_pair_likelihoods_stay_finite_for_large_inner_products():
    z = torch.full((3, 64), 30.0, dtype=torch.float32)
    labels = torch.tensor([0, 1, 1])
    for value in (dhn_loss(z, labels, 0.1), hashnet_loss(z, labels, alpha=5.0)):
        assert torch.isfinite(value)
    # theta = 0.5 * 64 * 900 for every pair: softplus(theta) - s theta is theta or 0.
    assert float(dhn_loss(z, labels, 0.0)) == pytest.approx(0.5 * 64 * 900 * 4 / 6, rel=1e-6)


def test_hashnet_loss_with_one_kind_of_pair_is_that_kind_alone():
    h = torch.tanh(outputs(3))
    same = torch.zeros(B, dtype=torch.int64)
    theta = (10.0 / BITS) * (h @ h.t())
    off = ~torch.eye(B, dtype=torch.bool)
    expected = (torch.nn.functional.softplus(theta) - theta)[off].mean()
    assert float(hashnet_loss(h, same)) == pytest.approx(float(expected), rel=1e-9)


def test_hashnet_beta_follows_the_authors_schedule():
    assert hashnet_beta(0) == 1.0
    assert hashnet_beta(199) == 1.0
    assert hashnet_beta(200) == pytest.approx(math.sqrt(2.0))
    assert hashnet_beta(1000) == pytest.approx(math.sqrt(6.0))
    assert hashnet_beta(7, step_size=1) == pytest.approx(math.sqrt(1.035))
    with pytest.raises(ValueError, match="step must be >= 0"):
        hashnet_beta(-1)


@pytest.mark.parametrize("bits", [8, 16, 32])
def test_hadamard_centres_are_far_apart_sign_vectors(bits):
    centres = hadamard_centres(10, bits)
    assert centres.shape == (10, bits) and centres.dtype == torch.float32
    assert set(centres.unique().tolist()) == {-1.0, 1.0}
    hamming = (bits - centres @ centres.t()) / 2
    off = ~torch.eye(10, dtype=torch.bool)
    assert hamming[off].min() >= bits / 2
    assert torch.equal(centres, hadamard_centres(10, bits, seed=5))  # no randomness


def test_hadamard_centres_for_24_bits_are_random_and_meet_the_papers_check():
    centres = hadamard_centres(10, 24, seed=3)
    assert set(centres.unique().tolist()) == {-1.0, 1.0}
    hamming = (24 - centres @ centres.t()) / 2
    off = ~torch.eye(10, dtype=torch.bool)
    assert hamming[off].min() > 24 / 4 and hamming[off].mean() >= 24 / 2
    assert torch.equal(centres, hadamard_centres(10, 24, seed=3))
    assert not torch.equal(centres, hadamard_centres(10, 24, seed=4))


@pytest.mark.parametrize(("classes", "bits"), [(21, 8), (100, 8), (40, 12)])
def test_hadamard_centres_beyond_the_matrix_are_distinct(classes, bits):
    centres = hadamard_centres(classes, bits)
    assert len({tuple(row) for row in centres.tolist()}) == classes
    if bits == 8:
        sylvester = hadamard_centres(16, 8)
        assert torch.equal(centres[:16], sylvester)


def test_hadamard_centres_reject_too_many_classes():
    with pytest.raises(ValueError, match="do not fit in 3 bits"):
        hadamard_centres(9, 3)


def test_csq_centre_of_single_and_multi_label():
    centres = hadamard_centres(C, 8)
    assert torch.equal(csq_centre_of(SINGLE, centres), centres[SINGLE])
    got = csq_centre_of(MULTI, centres, seed=7)
    tie = csq_centre_of(torch.zeros(1, C), centres, seed=7)[0]  # no label: every bit ties
    for n in range(B):
        for k in range(8):
            vote = sum(float(centres[c, k]) for c in range(C) if MULTI[n, c] > 0)
            expected = float(tie[k]) if vote == 0 else math.copysign(1.0, vote)
            assert float(got[n, k]) == expected
    assert set(tie.tolist()) <= {-1.0, 1.0}
    with pytest.raises(ValueError, match="class ids must lie in"):
        csq_centre_of(torch.tensor([0, C]), centres)


def test_csq_loss_matches_per_entry_loop():
    u = torch.tanh(outputs(4))
    centres = torch.where(outputs(5) > 0, 1.0, -1.0).to(torch.float64)
    total = 0.0
    for n in range(B):
        for k in range(BITS):
            h, c = (float(u[n, k]) + 1) / 2, (float(centres[n, k]) + 1) / 2
            total -= c * math.log(h) + (1 - c) * math.log(1 - h)
    quantization = sum((abs(float(v)) - 1) ** 2 for v in u.flatten())
    expected = total / (B * BITS) + 0.5 * quantization / (B * BITS)
    assert float(csq_loss(u, centres, 0.5)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        csq_loss(u, centres[:, :2], 0.5)


def test_gradients_match_finite_differences():
    labels = SINGLE
    centres = torch.where(outputs(6) > 0, 1.0, -1.0).to(torch.float64)
    losses = {
        "dsh": lambda x: dsh_loss(x, labels, alpha=0.1),
        "dhn": lambda x: dhn_loss(x, labels, 0.2),
        "hashnet": lambda x: hashnet_loss(torch.tanh(x), MULTI),
        "csq": lambda x: csq_loss(torch.tanh(x), centres, 0.3),
    }
    for name, loss in losses.items():
        x = outputs(7).requires_grad_(True)
        assert torch.autograd.gradcheck(loss, (x,)), name


def hidden_blobs(n: int = 160, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """4 classes told apart by 4 of 12 dimensions (class c: 3 on dimension c, noise 0.5); the
    other 8 are noise of std 3, so codes retrieve the class only once trained to find those 4.

    Returns:
        float32 (n, 12) features, int64 (n,) labels.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    informative = 3.0 * np.eye(4)[labels] + rng.normal(0, 0.5, (n, 4))
    features = np.concatenate([informative, rng.normal(0, 3.0, (n, 8))], axis=1)
    return features.astype(np.float32), labels.astype(np.int64)


def sign_code_map(layer: torch.nn.Linear, x: torch.Tensor, labels: np.ndarray) -> float:
    """mAP of the sign codes of the last 40 items (queries) against the first 120."""
    with torch.no_grad():
        codes = torch.sign(layer(x)).numpy()
    hamming = (codes.shape[1] - codes[120:] @ codes[:120].T) / 2
    return map_at_r(rank_by_distance(hamming), labels[120:], labels[:120])


def seeded_layer(bits: int) -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    """Linear(12, bits) on :func:`hidden_blobs` features (torch seed 0) and its Adam at lr
    0.01."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, bits)
    return layer, torch.optim.Adam(layer.parameters(), lr=0.01)


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One optimizer step down ``loss``; returns the loss's value."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def train_codes(method: str, steps: int = 200) -> dict[str, float]:
    """Train a linear hash layer (12 -> 16 bits, Adam) on :func:`hidden_blobs`.

    Returns:
        the first and last training loss, and the sign codes' mAP before and after.
    """
    features, all_labels = hidden_blobs()
    x, labels = torch.from_numpy(features), torch.from_numpy(all_labels)
    train_x, train_y = x[:120], labels[:120]
    layer, optimizer = seeded_layer(16)
    centres = csq_centre_of(train_y, hadamard_centres(4, 16))

    def loss_at(step: int) -> torch.Tensor:
        z = layer(train_x)
        if method == "dsh":
            return dsh_loss(z, train_y)
        if method == "dhn":
            return dhn_loss(torch.tanh(z), train_y, 0.1)
        if method == "hashnet":
            return hashnet_loss(torch.tanh(hashnet_beta(step, step_size=50) * z), train_y)
        return csq_loss(torch.tanh(z), centres, 1e-4)

    map_before = sign_code_map(layer, x, all_labels)
    losses = []
    for step in range(steps):
        loss = loss_at(step)
        losses.append(descend(optimizer, loss))
    return {
        "first": losses[0],
        "last": losses[-1],
        "map_before": map_before,
        "map_after": sign_code_map(layer, x, all_labels),
    }


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread (two spin and stall when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method", ["dsh", "dhn", "hashnet", "csq"])
def test_training_lowers_the_loss_and_codes_retrieve_the_class(method):
    chance = relevant_share(hidden_blobs()[1][120:], hidden_blobs()[1][:120])
    assert np.allclose(chance, 0.25)
    result = train_codes(method)
    assert result["last"] < 0.5 * result["first"]
    assert result["map_before"] < 0.45  # the noise dimensions hide the classes at first
    assert result["map_after"] > 0.95
