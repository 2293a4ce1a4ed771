"""dpq.serve.labels: labels between the index (class indices, -1, multi-hot rows) and JSON
(class names where known), both ways."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")

from dpq.serve.labels import (  # noqa: E402
    label_filter,
    labels_from_json,
    labels_to_json,
    predicted_labels,
)

CLASSES = ["cat", "dog", "eel"]


def test_to_json_names_indices_unknown_and_multi_hot():
    labels = np.array([0, 2, -1, 7])
    assert labels_to_json(labels, CLASSES) == ["cat", "eel", None, 7]  # 7: no name known
    assert labels_to_json(labels, None) == [0, 2, None, 7]
    rows = np.array([[1, 0, 1], [0, 0, 0]], np.uint8)
    assert labels_to_json(rows, CLASSES) == [["cat", "eel"], []]


def test_from_json_class_indices():
    out = labels_from_json(["dog", 2, "0", None], 4, (), CLASSES, has_items=True)
    assert out.dtype == np.int64 and out.tolist() == [1, 2, 0, -1]
    assert labels_from_json(None, 2, (), CLASSES, has_items=True).tolist() == [-1, -1]
    assert labels_from_json(None, 2, None, None, has_items=True) is None
    assert labels_from_json([5], 1, (), None, has_items=True).tolist() == [5]  # no class list


def test_from_json_multi_hot():
    out = labels_from_json([["cat", "eel"], "dog", None], 3, (3,), CLASSES, has_items=True)
    assert out.dtype == np.uint8 and out.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    assert labels_from_json(None, 2, (3,), CLASSES, has_items=True).shape == (2, 3)


def test_round_trip():
    values = ["eel", None, "cat"]
    assert labels_to_json(labels_from_json(values, 3, (), CLASSES, True), CLASSES) == values


@pytest.mark.parametrize(
    ("values", "shape", "classes", "has_items", "phrase"),
    [
        (["cow"], (), CLASSES, True, "unknown label 'cow'; use one of"),
        (["cow"], (), None, True, "unknown label 'cow'; use a class index"),
        ([3], (), CLASSES, True, r"label 3 is out of range 0..2"),
        ([-2], (), None, True, "out of range"),
        ([1.5j], (), None, True, "a label must be a class name or index"),
        ([1, 2], (), CLASSES, True, "give one label per item: 1 items but 2 labels"),
        ([1], None, None, True, "this index has no labels"),
        ([["cat", 9]], (3,), CLASSES, True, "label 9 is out of range"),
    ],
)
def test_from_json_refuses(values, shape, classes, has_items, phrase):
    with pytest.raises(ValueError, match=phrase):
        labels_from_json(values, 1, shape, classes, has_items)


def test_label_filter_of_names_and_indices():
    single = label_filter(["dog", 2, "0"], "any", (), CLASSES)
    assert single.classes.tolist() == [0, 1, 2]
    assert single.mask(np.array([1, -1, 2, 0])).tolist() == [True, False, True, True]
    one = label_filter(["eel"], "all", (), CLASSES)  # "all" of one label: that label
    assert one.mask(np.array([2, 1])).tolist() == [True, False]
    rows = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]], np.uint8)
    assert label_filter(["cat", "dog"], "all", (3,), CLASSES).mask(rows).tolist() == [
        True, False, False
    ]  # fmt: skip
    assert label_filter(["cat", "eel"], "any", (3,), CLASSES).mask(rows).tolist() == [
        True, True, True
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("values", "match", "shape", "phrase"),
    [
        (["cat"], "any", None, "this index has no labels"),
        (["cat", "dog"], "all", (), "one label per item"),
        (["cow"], "any", (), "unknown label 'cow'"),
        ([7], "any", (3,), "out of range 0..2"),
        (["cat"], "most", (), "filter.match must be one of"),
        ([], "any", (), "filter.labels is empty"),
    ],
)
def test_label_filter_refusals(values, match, shape, phrase):
    with pytest.raises(ValueError, match=phrase):
        label_filter(values, match, shape, CLASSES)


def test_predicted_labels_single_and_multi_label():
    logits = np.array([[0.0, 2.0, 0.0], [5.0, 0.0, 0.0]])
    single = predicted_labels(logits, multi_label=False, classes=CLASSES)
    assert [p["predicted_label"] for p in single] == ["dog", "cat"]
    top = np.exp(2.0) / (np.exp(2.0) + 2)
    assert single[0]["predicted_probability"] == pytest.approx(top, abs=1e-4)
    multi = predicted_labels(np.array([[1.0, -1.0, 3.0]]), multi_label=True, classes=CLASSES)
    assert multi == [{"predicted_label": ["cat", "eel"], "predicted_probability": None}]
