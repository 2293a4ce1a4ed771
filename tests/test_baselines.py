"""Every registered baseline gets the same checks on small synthetic clustered data."""

from __future__ import annotations

import numpy as np
import pytest

from dpq.evaluate.baselines import BASELINES, ITQ, ITQCCA, PQ, FaissQuantizer, make_baseline
from dpq.evaluate.baselines.hashing import hamming_distances, itq_rotation, pack_signs
from dpq.evaluate.metrics import map_at_r

# Fewer optimisation rounds than the defaults so the slow quantizers stay quick here.
FAST_OPTIONS = {
    "opq": {"iterations": 5},
    "rq": {"beam_size": 2},
    "lsq": {"train_iterations": 4, "encode_iterations": 4},
}
N_CLASSES, DIM = 10, 16


@pytest.fixture(scope="module")
def clustered():
    """10 Gaussian clusters in 16-d: 1,160 database points (also the training set), 40 queries."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0.0, 3.0, (N_CLASSES, DIM))
    labels = rng.integers(0, N_CLASSES, 1200)
    features = (centers[labels] + rng.normal(0.0, 1.5, (1200, DIM))).astype(np.float32)
    return {
        "query": features[:40],
        "query_labels": labels[:40],
        "db": features[40:],
        "db_labels": labels[40:],
    }


@pytest.fixture(scope="module")
def fitted(clustered):
    """(name, bits) -> baseline fitted and filled with the database, built once per module."""
    cache: dict[tuple[str, int], object] = {}

    def get(name: str, bits: int):
        if (name, bits) not in cache:
            baseline = make_baseline(name, bits, seed=0, **FAST_OPTIONS.get(name, {}))
            baseline.fit(clustered["db"], clustered["db_labels"])
            baseline.add(clustered["db"])
            cache[name, bits] = baseline
        return cache[name, bits]

    return get


def test_registry_names_and_classes():
    assert set(BASELINES) == {"pq", "opq", "rq", "lsq", "itq", "itq-cca", "lsh"}
    for name, cls in BASELINES.items():
        assert cls.name == name
        assert make_baseline(name, 8).bits == 8


@pytest.mark.parametrize("name", list(BASELINES))
def test_search_shapes_dtypes_order(name, fitted, clustered):
    baseline = fitted(name, 16)
    assert baseline.ntotal == len(clustered["db"])
    distances, ids = baseline.search(clustered["query"], 25)
    assert distances.shape == ids.shape == (40, 25)
    assert distances.dtype == np.float32 and ids.dtype == np.int64
    assert np.all(np.diff(distances, axis=1) >= 0)
    assert ids.min() >= 0 and ids.max() < baseline.ntotal
    # equal distances are ordered by ascending id
    ties = distances[:, 1:] == distances[:, :-1]
    assert np.all(ids[:, 1:][ties] > ids[:, :-1][ties])
    codes = baseline.encode(clustered["query"])
    assert codes.dtype == np.uint8 and codes.shape == (40, baseline.code_size)
    extra = 4 if name in ("rq", "lsq") else 0  # float32 norm stored beside the code
    assert baseline.code_size == 16 // 8 + extra


@pytest.mark.parametrize("name", list(BASELINES))
def test_database_point_finds_itself(name, fitted, clustered):
    baseline = fitted(name, 16)
    queries = clustered["db"][:50]
    distances, ids = baseline.search(queries, baseline.ntotal)
    own_position = np.argmax(ids == np.arange(50)[:, None], axis=1)
    if isinstance(baseline, FaissQuantizer):
        assert np.mean(own_position < 5) >= 0.9
    else:  # its own code is at Hamming distance 0, the smallest possible
        np.testing.assert_array_equal(distances[np.arange(50), own_position], 0.0)
        np.testing.assert_array_equal(distances[:, 0], 0.0)


@pytest.mark.parametrize("name", list(BASELINES))
def test_map_above_chance_on_clusters(name, fitted, clustered):
    baseline = fitted(name, 16)
    _, ids = baseline.search(clustered["query"], baseline.ntotal)
    score = map_at_r(ids, clustered["query_labels"], clustered["db_labels"])
    chance = np.mean(clustered["db_labels"][None, :] == clustered["query_labels"][:, None])
    assert score > chance + 0.3, (name, score, chance)


@pytest.mark.parametrize("name", ["pq", "opq", "rq", "lsq"])
def test_more_bits_lower_quantization_error(name, fitted, clustered):
    errors = [fitted(name, bits).quantization_error(clustered["db"]) for bits in (8, 16)]
    assert errors[1] <= errors[0] + 1e-6, errors
    reconstructed = fitted(name, 16).decode(fitted(name, 16).encode(clustered["db"][:5]))
    assert reconstructed.shape == (5, DIM) and reconstructed.dtype == np.float32


def test_pq_pads_dimension_not_divisible_by_subspaces(clustered):
    pq = PQ(24, seed=0).fit(clustered["db"][:, :13])  # 13 dims, 3 subspaces
    pq.add(clustered["db"][:, :13])
    assert pq.decode(pq.encode(clustered["db"][:3, :13])).shape == (3, 13)
    distances, ids = pq.search(clustered["db"][:3, :13], 5)
    expected = (
        (clustered["db"][:3, :13] - pq.decode(pq.encode(clustered["db"][:3, :13]))) ** 2
    ).sum(1)
    # the first result is at least as close as the item itself (distances are to reconstructions)
    assert np.all(distances[:, 0] <= expected + 1e-4)


def test_k_larger_than_database_pads(clustered):
    for name in ("pq", "lsh"):
        baseline = make_baseline(name, 8).fit(clustered["db"])
        baseline.add(clustered["db"][:3])
        distances, ids = baseline.search(clustered["query"][:2], 5)
        assert np.all(ids[:, 3:] == -1) and np.all(np.isinf(distances[:, 3:]))
        assert np.all(ids[:, :3] >= 0)


def test_hamming_distances_match_bit_loop():
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (5, 9), dtype=np.uint8)  # 72 bits: crosses a 64-bit word
    b = rng.integers(0, 256, (7, 9), dtype=np.uint8)
    bits_a, bits_b = np.unpackbits(a, axis=1), np.unpackbits(b, axis=1)
    expected = (bits_a[:, None, :] != bits_b[None, :, :]).sum(-1)
    np.testing.assert_array_equal(hamming_distances(a, b), expected)
    np.testing.assert_array_equal(
        np.unpackbits(pack_signs(np.array([[0.5, -1.0, 0.0]])))[:3], [1, 0, 1]
    )


def test_itq_rotation_is_orthogonal_and_lowers_quantization_loss():
    rng = np.random.default_rng(5)
    projected = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))

    def loss(rotation):
        rotated = projected @ rotation
        return np.sum((np.where(rotated >= 0, 1.0, -1.0) - rotated) ** 2)

    rotation = itq_rotation(projected, 50, np.random.default_rng(0))
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(8), atol=1e-10)
    start = itq_rotation(projected, 0, np.random.default_rng(0))
    assert loss(rotation) < loss(start)


def test_itq_cca_uses_labels_and_accepts_multi_hot(clustered):
    with pytest.raises(ValueError, match="supervised"):
        ITQCCA(8).fit(clustered["db"])
    multi_hot = np.eye(N_CLASSES, dtype=np.uint8)[clustered["db_labels"]]
    model = ITQCCA(8).fit(clustered["db"], multi_hot)
    assert model.correlations is not None and model.correlations[0] > 0.9
    # with labels, CCA beats unsupervised PCA on these clusters at 8 bits
    scores = {}
    for baseline in (model, ITQ(8).fit(clustered["db"])):
        baseline.add(clustered["db"])
        _, ids = baseline.search(clustered["query"], baseline.ntotal)
        scores[baseline.name] = map_at_r(ids, clustered["query_labels"], clustered["db_labels"])
    assert scores["itq-cca"] >= scores["itq"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda data: make_baseline("sh", 8), "unknown baseline"),
        (lambda data: make_baseline("pq", 12), "multiple of 8"),
        (lambda data: make_baseline("lsh", 0), "positive"),
        (lambda data: make_baseline("pq", 8).search(data["query"], 3), "not fitted"),
        (
            lambda data: make_baseline("lsh", 8).fit(data["db"]).add(data["db"][:, :5]),
            "dimension 5",
        ),
        (lambda data: make_baseline("lsh", 8).fit(data["db"] * np.nan), "NaN"),
        (lambda data: make_baseline("itq", 32).fit(data["db"]), "32 dimensions"),
        (lambda data: make_baseline("lsh", 8).fit(data["db"]).search(data["query"], 0), "positive"),
        (lambda data: ITQCCA(8).fit(data["db"], data["db_labels"][:10]), "one per row"),
    ],
)
def test_bad_input_raises_value_error(call, message, clustered):
    with pytest.raises(ValueError, match=message):
        call(clustered)
