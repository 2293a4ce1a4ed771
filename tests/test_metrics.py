"""dpq.evaluate.metrics against hand-computed tables and a slow per-query loop reference."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from dpq.evaluate import metrics
from dpq.evaluate.metrics import (
    average_precision_at_r,
    map_at_r,
    pr_curve,
    precision_at,
    rank_by_distance,
)

# Single-label table: database classes, and for each query its class and its ranking.
# Query 0 (class 0): relevance along its ranking 1 0 1 0 1.
# Query 1 (class 1): relevance 0 0 0 1 1.
# Query 2 (class 2): no item of class 2 in the database.
SINGLE_DB = np.array([0, 1, 0, 1, 0])
SINGLE_QUERIES = np.array([0, 1, 2])
SINGLE_RANKING = np.array([[0, 1, 2, 3, 4], [0, 2, 4, 1, 3], [4, 3, 2, 1, 0]])

SINGLE_TABLE = [
    # (r, convention, expected AP per query)
    (None, "retrieved", [(1 + 2 / 3 + 3 / 5) / 3, (1 / 4 + 2 / 5) / 2, 0.0]),
    (None, "all_relevant", [(1 + 2 / 3 + 3 / 5) / 3, (1 / 4 + 2 / 5) / 2, 0.0]),
    (3, "retrieved", [(1 + 2 / 3) / 2, 0.0, 0.0]),
    (3, "all_relevant", [(1 + 2 / 3) / 3, 0.0, 0.0]),
    (4, "all_relevant", [(1 + 2 / 3) / 3, (1 / 4) / 2, 0.0]),
    (1, "retrieved", [1.0, 0.0, 0.0]),
    (1, "all_relevant", [1.0, 0.0, 0.0]),
]

# Multi-label table: relevant = shares at least one label.
MULTI_DB = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=np.uint8)
MULTI_QUERIES = np.array([[0, 1, 0], [1, 0, 1], [0, 0, 0]], dtype=np.uint8)
MULTI_RANKING = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [0, 1, 2, 3]])
MULTI_TABLE = [
    # query 0: relevance 0 1 1 0 (2 relevant in db); query 1: 1 1 0 1 (3 relevant);
    # query 2 has no label, so nothing is relevant.
    (None, "retrieved", [(1 / 2 + 2 / 3) / 2, (1 + 1 + 3 / 4) / 3, 0.0]),
    (None, "all_relevant", [(1 / 2 + 2 / 3) / 2, (1 + 1 + 3 / 4) / 3, 0.0]),
    (2, "retrieved", [1 / 2, 1.0, 0.0]),
    (2, "all_relevant", [(1 / 2) / 2, 1.0, 0.0]),
]


def loop_average_precision(ranking, query_labels, db_labels, r, convention):
    """Slow reference: one query at a time, one rank at a time."""
    result = []
    for row, query in zip(ranking, query_labels, strict=True):
        if np.ndim(query) == 0:
            relevant_all = [db_labels[i] == query for i in range(len(db_labels))]
        else:
            relevant_all = [
                bool(np.any(np.logical_and(db_labels[i], query))) for i in range(len(db_labels))
            ]
        hits, total = 0, 0.0
        for k, item in enumerate(row[:r], start=1):
            if relevant_all[item]:
                hits += 1
                total += hits / k
        denominator = hits if convention == "retrieved" else min(sum(relevant_all), r)
        result.append(total / denominator if denominator else 0.0)
    return np.array(result)


@pytest.mark.parametrize(("r", "convention", "expected"), SINGLE_TABLE)
def test_single_label_table(r, convention, expected):
    ap = average_precision_at_r(SINGLE_RANKING, SINGLE_QUERIES, SINGLE_DB, r, convention)
    np.testing.assert_allclose(ap, expected, rtol=1e-12)
    assert map_at_r(SINGLE_RANKING, SINGLE_QUERIES, SINGLE_DB, r, convention) == pytest.approx(
        np.mean(expected), rel=1e-12
    )


@pytest.mark.parametrize(("r", "convention", "expected"), MULTI_TABLE)
def test_multi_label_table(r, convention, expected):
    ap = average_precision_at_r(MULTI_RANKING, MULTI_QUERIES, MULTI_DB, r, convention)
    np.testing.assert_allclose(ap, expected, rtol=1e-12)


def test_bool_multi_hot_equals_uint8():
    as_bool = map_at_r(MULTI_RANKING, MULTI_QUERIES.astype(bool), MULTI_DB.astype(bool))
    assert as_bool == map_at_r(MULTI_RANKING, MULTI_QUERIES, MULTI_DB)


def test_query_without_relevant_item_counts_as_zero_not_dropped():
    with_empty = map_at_r(SINGLE_RANKING, SINGLE_QUERIES, SINGLE_DB)
    without = map_at_r(SINGLE_RANKING[:2], SINGLE_QUERIES[:2], SINGLE_DB)
    assert with_empty == pytest.approx(without * 2 / 3)


def test_ties_go_to_lower_database_index():
    distances = np.array([[0.5, 0.2, 0.5, 0.2, 0.9]])
    ranking = rank_by_distance(distances)
    np.testing.assert_array_equal(ranking, [[1, 3, 0, 2, 4]])
    db = np.array([0, 0, 1, 1, 0])
    # Index order within ties gives relevance 1 0 1 0 1; the opposite order 0 1 0 1 1.
    assert map_at_r(ranking, np.array([0]), db) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    reversed_ties = np.array([[3, 1, 2, 0, 4]])
    assert map_at_r(reversed_ties, np.array([0]), db) == pytest.approx((1 / 2 + 2 / 4 + 3 / 5) / 3)


@pytest.mark.parametrize("k", [1, 3, 7, 20])
def test_rank_by_distance_partial_equals_full_prefix_with_many_ties(k):
    rng = np.random.default_rng(3)
    distances = rng.integers(0, 4, size=(6, 20)).astype(np.float32)  # many exact ties
    full = rank_by_distance(distances)
    np.testing.assert_array_equal(full, np.argsort(distances, axis=1, kind="stable"))
    partial = rank_by_distance(distances, k=k)
    assert partial.dtype == np.int64 and partial.shape == (6, min(k, 20))
    np.testing.assert_array_equal(partial, full[:, :k])


@pytest.mark.parametrize("convention", ["retrieved", "all_relevant"])
@pytest.mark.parametrize("r", [None, 1, 17, 60])
def test_single_label_matches_loop_reference(convention, r):
    rng = np.random.default_rng(0)
    db = rng.integers(0, 5, 60)
    queries = rng.integers(0, 6, 25)  # class 5 never occurs in the database
    ranking = np.argsort(rng.random((25, 60)), axis=1)
    expected = loop_average_precision(ranking, queries, db, r or 60, convention)
    np.testing.assert_allclose(
        average_precision_at_r(ranking, queries, db, r, convention), expected, rtol=1e-12
    )


@pytest.mark.parametrize("n_classes", [5, 70])  # 70 classes spill into a second 64-bit word
@pytest.mark.parametrize("convention", ["retrieved", "all_relevant"])
def test_multi_label_matches_loop_reference(n_classes, convention, monkeypatch):
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 100)  # force many small blocks
    rng = np.random.default_rng(1)
    db = (rng.random((50, n_classes)) < 2.0 / n_classes).astype(np.uint8)
    queries = (rng.random((12, n_classes)) < 2.0 / n_classes).astype(np.uint8)
    ranking = np.argsort(rng.random((12, 50)), axis=1)[:, :30]
    expected = loop_average_precision(ranking, queries, db, 30, convention)
    np.testing.assert_allclose(
        average_precision_at_r(ranking, queries, db, None, convention), expected, rtol=1e-12
    )


def test_precision_at_table():
    curve = precision_at(SINGLE_RANKING[:2], SINGLE_QUERIES[:2], SINGLE_DB, [1, 3, 5])
    np.testing.assert_allclose(curve, [(1 + 0) / 2, (2 / 3 + 0) / 2, (3 / 5 + 2 / 5) / 2])


def test_pr_curve_table_and_default_cutoffs():
    curve = pr_curve(SINGLE_RANKING[:2], SINGLE_QUERIES[:2], SINGLE_DB, cutoffs=[1, 3, 5])
    np.testing.assert_array_equal(curve.cutoffs, [1, 3, 5])
    np.testing.assert_allclose(curve.precision, [1 / 2, 1 / 3, 1 / 2])
    np.testing.assert_allclose(curve.recall, [(1 / 3 + 0) / 2, (2 / 3 + 0) / 2, 1.0])
    default = pr_curve(SINGLE_RANKING[:2], SINGLE_QUERIES[:2], SINGLE_DB)
    assert default.cutoffs[0] == 1 and default.cutoffs[-1] == 5
    assert default.recall[-1] == pytest.approx(1.0)
    assert np.all(np.diff(default.recall) >= 0)
    assert set(default.to_dict()) == {"cutoffs", "precision", "recall"}
    cutoffs = metrics.default_cutoffs(54_000)
    assert cutoffs[0] == 1 and cutoffs[-1] == 54_000 and np.all(np.diff(cutoffs) > 0)
    assert np.sum(cutoffs <= 1000) >= 15  # detail at the top of the ranking


def test_multi_label_curves_match_loop():
    rng = np.random.default_rng(2)
    db = (rng.random((40, 4)) < 0.3).astype(np.uint8)
    queries = (rng.random((7, 4)) < 0.3).astype(np.uint8)
    ranking = np.argsort(rng.random((7, 40)), axis=1)
    relevant = (queries @ db.T > 0)[np.arange(7)[:, None], ranking]
    np.testing.assert_allclose(
        precision_at(ranking, queries, db, [2, 10, 40]),
        (np.cumsum(relevant, axis=1)[:, [1, 9, 39]] / [2, 10, 40]).mean(axis=0),
    )


def test_r_larger_than_database_is_clamped_with_a_warning():
    with pytest.warns(UserWarning, match="larger than the database"):
        clamped = map_at_r(SINGLE_RANKING, SINGLE_QUERIES, SINGLE_DB, r=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert clamped == map_at_r(SINGLE_RANKING, SINGLE_QUERIES, SINGLE_DB, r=5)


@pytest.mark.parametrize(
    ("ranking", "queries", "db", "kwargs", "message"),
    [
        (np.array([[0, 5]]), np.array([0]), SINGLE_DB, {}, r"in \[0, 5\)"),
        (np.array([[0, -1]]), np.array([0]), SINGLE_DB, {}, "k <= the database size"),
        (SINGLE_RANKING, np.array([0, 1]), SINGLE_DB, {}, "3 rows but there are 2 query labels"),
        (np.zeros((0, 5), dtype=np.int64), np.zeros(0, dtype=np.int64), SINGLE_DB, {}, "empty"),
        (SINGLE_RANKING[:, :2], SINGLE_QUERIES, SINGLE_DB, {"r": 3}, "k >= 3"),
        (SINGLE_RANKING, SINGLE_QUERIES, SINGLE_DB, {"r": 0}, "at least 1"),
        (SINGLE_RANKING, SINGLE_QUERIES, SINGLE_DB, {"convention": "pml"}, "convention"),
        (SINGLE_RANKING, SINGLE_QUERIES, SINGLE_DB[:4], {}, "more items than the database"),
        (SINGLE_RANKING.astype(float), SINGLE_QUERIES, SINGLE_DB, {}, "integer database ids"),
        (SINGLE_RANKING, SINGLE_QUERIES.astype(float), SINGLE_DB, {}, "integer class ids"),
        (MULTI_RANKING, MULTI_QUERIES, MULTI_DB[:, :2], {}, "same number of classes"),
        (MULTI_RANKING, MULTI_QUERIES * 2, MULTI_DB, {}, "only 0 and 1"),
        (MULTI_RANKING, np.array([0, 1, 2]), MULTI_DB, {}, "both"),
    ],
)
def test_bad_input_raises_value_error(ranking, queries, db, kwargs, message):
    with pytest.raises(ValueError, match=message):
        map_at_r(ranking, queries, db, **kwargs)


def test_bad_curve_cutoffs_and_distances():
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        precision_at(SINGLE_RANKING, SINGLE_QUERIES, SINGLE_DB, [0, 3])
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        pr_curve(SINGLE_RANKING[:, :3], SINGLE_QUERIES, SINGLE_DB, cutoffs=[4])
    with pytest.raises(ValueError, match="NaN"):
        rank_by_distance(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="2-D"):
        rank_by_distance(np.zeros(3))


def test_relevant_share_counts_same_class_or_any_shared_label():
    # Single-label: query 0 (class 0) has 3 of 5, query 1 has 2 of 5, query 2 none.
    share = metrics.relevant_share(SINGLE_QUERIES, SINGLE_DB)
    np.testing.assert_allclose(share, [3 / 5, 2 / 5, 0.0])
    # Multi-label: relevant when at least one label is shared.
    database = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=np.uint8)
    queries = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], dtype=np.uint8)
    np.testing.assert_allclose(metrics.relevant_share(queries, database), [2 / 4, 3 / 4, 0.0])


def test_relevant_share_is_what_a_random_ranking_scores_on_average():
    rng = np.random.default_rng(0)
    database = (rng.random((300, 5)) < 0.3).astype(np.uint8)
    queries = (rng.random((40, 5)) < 0.3).astype(np.uint8)
    rankings = [np.stack([rng.permutation(300) for _ in range(40)]) for _ in range(20)]
    random_map = np.mean([map_at_r(r, queries, database) for r in rankings])
    expected = metrics.relevant_share(queries, database)
    # a query with no relevant item scores 0 under either; the others average their share
    assert abs(random_map - expected.mean()) < 0.02
