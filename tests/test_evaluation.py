"""dpq.evaluate.retrieval: every method a searcher scored the same way, against direct computation;
a trained model of another method than DPQ evaluated by its own codes and distance; the
class-probability diagnostic."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import feature_config, feature_data
from dpq.evaluate import retrieval as evaluation_module
from dpq.evaluate.baselines import make_baseline
from dpq.evaluate.feature_set import FeatureSet
from dpq.evaluate.metrics import map_at_r, pr_curve, precision_at
from dpq.evaluate.retrieval import class_probability_map, evaluate_methods, evaluate_retrieval
from dpq.evaluate.rows import baseline_methods, dpq_methods, float_method
from dpq.index import DPQIndex
from dpq.methods import method_for


def test_evaluate_methods_matches_direct_computation(feature_dir, monkeypatch):
    monkeypatch.setattr(evaluation_module, "_RESULT_ELEMENTS", 7 * 870)  # 7 queries per batch
    features = FeatureSet.from_directory(feature_dir)
    index = DPQIndex.load(feature_dir / "index.npz")
    methods = dpq_methods(index, [8, 16], n_database=870, dim=16)
    methods += baseline_methods(["pq", "lsh"], [8, 16], features)
    methods.append(float_method(features))
    result = evaluate_methods(
        features, methods, curve_bits=[16], precision_ranks=[10, 50, 5000], progress=False
    )
    table = result.map_table()
    assert list(table) == ["dpq", "pq", "lsh"] and all(
        set(row) == {8, 16} for row in table.values()
    )
    assert result.fitted_on == "train" and result.r == 870
    assert result.notes == [
        "The baselines' k-means saw 600 training rows for 256 codewords, fewer than the 9,984 "
        "faiss suggests; their codebooks are fitted on what the protocol gives them."
    ]
    assert 0.0 <= result.float_reference() <= 1.0

    # the batched evaluation equals one direct search + map_at_r
    pq = make_baseline("pq", 16, seed=0).fit(features.train_features)
    pq.add(features.db_features)
    _, ids = pq.search(features.query_features, 870)
    assert table["pq"][16] == pytest.approx(
        map_at_r(ids, features.query_labels, features.db_labels)
    )
    pr, at_r = result.curves(16)
    direct = pr_curve(ids, features.query_labels, features.db_labels, cutoffs=pr["pq"].cutoffs)
    np.testing.assert_allclose(pr["pq"].precision, direct.precision)
    np.testing.assert_allclose(pr["pq"].recall, direct.recall)
    ranks, precision = at_r["pq"]
    np.testing.assert_array_equal(ranks, [10, 50])  # 5000 > R was dropped
    np.testing.assert_allclose(
        precision, precision_at(ids, features.query_labels, features.db_labels, [10, 50])
    )

    _, ids = index.search(features.query_features, 870, num_levels=1)
    assert table["dpq"][8] == pytest.approx(
        map_at_r(ids, features.query_labels, features.db_labels)
    )
    assert json.loads(json.dumps(result.to_dict()))["map"]["dpq"]["8"] == table["dpq"][8]


def test_inner_product_metric_ranks_float_and_quantizers_by_inner_product(feature_dir):
    from dataclasses import replace

    l2 = FeatureSet.from_directory(feature_dir)
    ip = replace(l2, metric="ip")
    index = DPQIndex.load(feature_dir / "index.npz")
    index.search_mode = "ip"
    methods = dpq_methods(index, [16]) + baseline_methods(["pq", "lsh"], [16], ip)
    result = evaluate_methods(ip, [*methods, float_method(ip)], progress=False)
    table = result.map_table()

    def ip_map(database: np.ndarray) -> float:
        scores = ip.query_features @ database.T
        ids = np.argsort(-scores, axis=1, kind="stable")  # ties by id
        return map_at_r(ids, ip.query_labels, ip.db_labels)

    assert result.float_reference() == pytest.approx(ip_map(ip.db_features), abs=1e-6)
    pq = make_baseline("pq", 16, seed=0).fit(ip.train_features)
    assert table["pq"][16] == pytest.approx(ip_map(pq.decode(pq.encode(ip.db_features))), abs=1e-6)
    assert table["dpq"][16] == pytest.approx(ip_map(index.decode(index.codes)), abs=1e-6)
    # hashing ranks by Hamming distance whatever the metric
    hamming = evaluate_methods(l2, baseline_methods(["lsh"], [16], l2), progress=False)
    hamming = hamming.map_table()
    assert table["lsh"][16] == hamming["lsh"][16]
    # on these clustered (not normalised) features the two metrics rank differently
    assert result.float_reference() != pytest.approx(
        evaluate_methods(l2, [float_method(l2)], progress=False).float_reference()
    )
    with pytest.raises(ValueError, match="metric must be one of"):
        replace(l2, metric="cosine")


def test_evaluate_r_clamped_and_fit_on_database_noted(feature_dir):
    features = FeatureSet.from_directory(feature_dir)
    database_only = FeatureSet(
        query_features=features.query_features,
        query_labels=features.query_labels,
        db_features=features.db_features,
        db_labels=features.db_labels,
    )
    methods = baseline_methods(["lsh"], [8], database_only)
    result = evaluate_methods(database_only, methods, r=10_000, progress=False)
    assert result.r == 870 and result.r_requested == 10_000
    assert any("larger than the database" in note for note in result.notes)
    assert any("fitted on the database" in note for note in result.notes)


def test_class_probability_map_equals_a_full_ranking_by_probability_distance():
    rng = np.random.default_rng(0)
    query_labels, database_labels = rng.integers(0, 4, 37), rng.integers(0, 4, 211)
    query_logits = rng.normal(size=(37, 4)) + 2.0 * np.eye(4)[query_labels]
    database_logits = rng.normal(size=(211, 4)) + 2.0 * np.eye(4)[database_labels]

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    qp, dp = softmax(query_logits), softmax(database_logits)
    distances = ((qp[:, None, :] - dp[None, :, :]) ** 2).sum(2)  # the slow way: (nq, N, C)
    expected = map_at_r(np.argsort(distances, axis=1, kind="stable"), query_labels, database_labels)
    for chunk in (5, 64):
        got = class_probability_map(
            query_logits, database_logits, query_labels, database_labels, 211, chunk=chunk
        )
        assert got == pytest.approx(expected, abs=1e-12)
    # a classifier that is always right and sure ranks every relevant item first
    perfect = class_probability_map(
        50.0 * np.eye(4)[query_labels], 50.0 * np.eye(4)[database_labels],
        query_labels, database_labels, 211,
    )  # fmt: skip
    assert perfect == pytest.approx(1.0)


def test_a_sign_model_is_evaluated_by_hamming_distance_between_its_codes():
    """evaluate_retrieval on a model of the "sign" method: one row at its 16 bits, equal to
    a ranking by Hamming distance between sign bits (ties by database order) scored with
    map_at_r; curves at 16 bits; no classifier, so no accuracy."""
    torch.manual_seed(0)
    config = feature_config().replace(method={"name": "sign", "bits": 16})
    network = method_for(config).build_network().eval()
    data = feature_data(n=150, seed=4)
    query, database = slice(0, 30), slice(30, 150)
    evaluation = evaluate_retrieval(
        network,
        data.images[query],
        data.labels[query],
        data.images[database],
        data.labels[database],
        baselines=["lsh"],
        train_inputs=data.images[database],
        train_labels=data.labels[database],
        curves=True,
        progress=False,
    )
    bits = network.extract_features(data.images) > 0
    hamming = (bits[query][:, None, :] != bits[database][None, :, :]).sum(2)
    ranking = np.argsort(hamming, axis=1, kind="stable")
    expected = map_at_r(ranking, data.labels[query], data.labels[database])
    assert evaluation.map_by_bits == {16: pytest.approx(expected, abs=1e-12)}
    assert (evaluation.method, evaluation.search) == ("sign", "Hamming distance")
    assert evaluation.query_accuracy is None and evaluation.class_probability_map is None
    details = evaluation.details
    assert details.map_table().keys() == {"sign", "lsh"} and evaluation.float_map is not None
    assert list(details.curves(16)[0]) == ["sign", "lsh"]
    sign_row = next(r for r in details.results if r.method == "sign")
    assert sign_row.settings["search"] == "Hamming distance (faiss IndexBinaryFlat)"
