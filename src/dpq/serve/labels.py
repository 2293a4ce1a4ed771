"""Item labels between the index and JSON.

The index stores a label per item as an int64 class index (-1: unknown) or, for multi-label
collections, a multi-hot uint8 row of C classes. The API shows class names where the
collection knows them (``classes``), class indices otherwise, lists for multi-hot labels and
None for an unknown label; and takes class names or indices (as ints or digit strings).
A search filter (:func:`label_filter`) names labels the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "LabelFilter",
    "label_filter",
    "labels_from_json",
    "labels_to_json",
    "predicted_labels",
]

FILTER_MATCHES = ("any", "all")


def _label_name(label: int, classes: Sequence[str] | None) -> Any:
    if classes is not None and 0 <= label < len(classes):
        return classes[label]
    return label


def labels_to_json(labels: np.ndarray, classes: Sequence[str] | None) -> list[Any]:
    """JSON-ready labels of index labels int (n,) or multi-hot (n, C): per item a class name
    (when known, else the class index) or None for -1; a list of them for a multi-hot row."""
    out: list[Any] = []
    for value in labels:
        if labels.ndim == 1:
            out.append(_label_name(int(value), classes) if value >= 0 else None)
        else:
            out.append([_label_name(int(i), classes) for i in np.flatnonzero(value)])
    return out


def _label_index(value: Any, classes: Sequence[str] | None, count: int | None) -> int:
    """The class index of one JSON label (a class name or an index below ``count``)."""
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        if classes is None or value not in classes:
            known = f"one of {list(classes)}" if classes else "a class index"
            raise ValueError(f"unknown label {value!r}; use {known}.")
        return list(classes).index(value)
    try:
        label = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"a label must be a class name or index; got {value!r}.") from None
    if label < 0 or (count is not None and label >= count):
        raise ValueError(f"label {label} is out of range 0..{(count or 1) - 1}.")
    return label


def labels_from_json(
    values: Sequence[Any] | None,
    n: int,
    label_shape: tuple[int, ...] | None,
    classes: Sequence[str] | None,
    has_items: bool,
) -> np.ndarray | None:
    """Index labels for n new items of an index whose labels have ``label_shape`` (None: no
    labels, (): class indices, (C,): multi-hot rows).

    values: per item an int, a class name, None (unknown), or for multi-hot a list of them;
    None for no labels at all (every item unknown). An index without labels takes labels
    only while it is empty (``has_items`` False). Returns int64 (n,), uint8 (n, C) or None.
    """
    if values is None:
        if label_shape is None:
            return None
        return np.full(n, -1, np.int64) if label_shape == () else np.zeros((n, *label_shape))
    if len(values) != n:
        raise ValueError(f"give one label per item: {n} items but {len(values)} labels.")
    if label_shape is None and has_items:
        raise ValueError("this index has no labels; add the items without labels.")
    if label_shape is not None and len(label_shape) == 1:
        rows = np.zeros((n, label_shape[0]), np.uint8)
        for i, value in enumerate(values):
            for one in [] if value is None else value if isinstance(value, list) else [value]:
                rows[i, _label_index(one, classes, label_shape[0])] = 1
        return rows
    count = len(classes) if classes is not None else None
    return np.array(
        [-1 if value is None else _label_index(value, classes, count) for value in values],
        np.int64,
    )


@dataclass(frozen=True)
class LabelFilter:
    """Items whose label is one of ``classes`` (``match`` "any") or, for multi-hot labels,
    that carry all of them ("all"). ``classes``: int64 (m,) class indices."""

    classes: np.ndarray
    match: str

    def mask(self, labels: np.ndarray) -> np.ndarray:
        """bool (n,) of index labels int64 (n,) or multi-hot (n, C): which items pass."""
        if labels.ndim == 1:
            return np.isin(labels, self.classes)
        chosen = labels[:, self.classes] > 0
        return chosen.all(axis=1) if self.match == "all" else chosen.any(axis=1)


def label_filter(
    values: Sequence[Any],
    match: str,
    label_shape: tuple[int, ...] | None,
    classes: Sequence[str] | None,
) -> LabelFilter:
    """The :class:`LabelFilter` of JSON labels (class names or indices) for an index whose
    labels have ``label_shape`` (None: no labels, (): class indices, (C,): multi-hot)."""
    if label_shape is None:
        raise ValueError(
            "this index has no labels, so it cannot filter by label; leave 'filter' out."
        )
    if match not in FILTER_MATCHES:
        raise ValueError(f"filter.match must be one of {FILTER_MATCHES}; got {match!r}.")
    count = label_shape[0] if label_shape else (len(classes) if classes is not None else None)
    wanted = np.unique([_label_index(value, classes, count) for value in values]).astype(np.int64)
    if not wanted.size:
        raise ValueError("filter.labels is empty; name at least one label, or leave 'filter' out.")
    if label_shape == () and match == "all" and wanted.size > 1:
        raise ValueError(
            f"this index has one label per item, so no item has all of {len(wanted)} labels; "
            'use "match": "any" (or name one label).'
        )
    return LabelFilter(wanted, match)


def predicted_labels(
    logits: np.ndarray, multi_label: bool, classes: Sequence[str] | None
) -> list[dict[str, Any]]:
    """Per row of classifier logits float (n, C): ``{"predicted_label", "predicted_probability"}``
    as JSON: the most probable class (softmax) and its probability; for a multi-label model
    the list of classes whose sigmoid is above 0.5, and the probability None."""
    logits = np.asarray(logits, np.float64)
    if multi_label:
        chosen = (1.0 / (1.0 + np.exp(-logits)) > 0.5).astype(np.uint8)
        return [
            {"predicted_label": label, "predicted_probability": None}
            for label in labels_to_json(chosen, classes)
        ]
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    best = probabilities.argmax(axis=1)
    return [
        {"predicted_label": label, "predicted_probability": round(float(p), 4)}
        for label, p in zip(labels_to_json(best, classes), probabilities.max(axis=1), strict=True)
    ]
