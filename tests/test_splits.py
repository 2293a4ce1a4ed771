"""Tests for dpq.data.splits: protocol sizes, disjointness, determinism, save/load."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from dpq.data.sources import Source
from dpq.data.splits import (
    Split,
    split_imagenet100,
    split_nus_wide,
    split_per_class,
    split_source,
)


def _cifar_like_labels() -> np.ndarray:
    """60,000 labels, 6,000 per class, interleaved like a merged train+test set."""
    return np.tile(np.arange(10, dtype=np.int64), 6000)


def test_cifar_protocol_sizes_disjoint_and_deterministic() -> None:
    labels = _cifar_like_labels()
    split = split_per_class(labels, 500, 100, seed=0)
    assert split.sizes == {"train": 5000, "query": 1000, "database": 54000}
    assert not np.intersect1d(split.train, split.query).size
    assert not np.intersect1d(split.database, split.query).size
    assert not np.intersect1d(split.database, split.train).size
    everything = np.concatenate([split.train, split.query, split.database])
    np.testing.assert_array_equal(np.sort(everything), np.arange(60000))
    np.testing.assert_array_equal(np.bincount(labels[split.train]), np.full(10, 500))
    np.testing.assert_array_equal(np.bincount(labels[split.query]), np.full(10, 100))
    assert split == split_per_class(labels, 500, 100, seed=0)
    other = split_per_class(labels, 500, 100, seed=1)
    assert not np.array_equal(other.query, split.query)
    for array in (split.train, split.query, split.database):
        assert array.dtype == np.int64 and np.all(np.diff(array) > 0)


def test_train_in_database_option() -> None:
    split = split_per_class(_cifar_like_labels(), 500, 100, seed=0, train_in_database=True)
    assert split.sizes == {"train": 5000, "query": 1000, "database": 59000}
    assert np.isin(split.train, split.database).all()


def test_too_many_per_class_names_the_class() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [2] * 10)
    with pytest.raises(
        ValueError, match=r"class 'bird' \(index 1\) has 3 items .* 4 training \+ 1 query"
    ):
        split_per_class(labels, 4, 1, classes=["cat", "bird", "dog"])
    with pytest.raises(ValueError, match="class 1 has 3 items"):
        split_per_class(labels, 4, 1)
    with pytest.raises(ValueError, match="multi-label"):
        split_per_class(np.zeros((5, 3), np.uint8), 1, 1)
    with pytest.raises(ValueError, match="non-negative integer"):
        split_per_class(labels, -1, 1)


def test_nus_wide_protocol() -> None:
    split = split_nus_wide(20000, seed=3)
    assert split.sizes == {"train": 10000, "query": 5000, "database": 15000}
    assert not np.intersect1d(split.query, split.database).size
    assert np.isin(split.train, split.database).all()
    np.testing.assert_array_equal(np.union1d(split.query, split.database), np.arange(20000))
    assert split == split_nus_wide(20000, seed=3)
    with pytest.raises(ValueError, match="lower n_query/n_train"):
        split_nus_wide(12000)


def test_imagenet100_protocol() -> None:
    labels = np.repeat(np.arange(5), 130)
    split = split_imagenet100(labels, num_queries=250, seed=0)
    assert split.separate_queries
    assert split.sizes == {"train": 500, "query": 250, "database": 650}
    np.testing.assert_array_equal(np.bincount(labels[split.train]), np.full(5, 100))
    assert split == split_imagenet100(labels, num_queries=250, seed=0)
    with pytest.raises(ValueError, match="class 4 has 99 database items"):
        split_imagenet100(labels[:-31], num_queries=10)


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_save_load_round_trip(tmp_path: Path, suffix: str) -> None:
    split = split_per_class(_cifar_like_labels(), 500, 100, seed=7)
    path = tmp_path / f"split{suffix}"
    split.save(path)
    loaded = Split.load(path)
    assert loaded == split and loaded.seed == 7 and loaded.protocol == split.protocol
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    assert path.stat().st_size < 600_000


def test_load_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"train": [1], "query": [2], "database": [3]}))
    with pytest.raises(ValueError, match="not a dpq split file"):
        Split.load(path)
    path.write_text(
        json.dumps(
            {"format": "dpq-split", "version": 1, "train": [1, 1], "query": [], "database": []}
        )
    )
    with pytest.raises(ValueError, match="repeats an index"):
        Split.load(path)
    with pytest.raises(ValueError, match=".json or .npz"):
        split_nus_wide(20, 5, 5).save(tmp_path / "x.pkl")


def test_a_source_is_split_by_its_protocol() -> None:
    labels = np.repeat(np.arange(3, dtype=np.int64), 10)
    source = Source(None, labels, ["a", "b", "c"], "image-folder", "photos/")
    assert split_source(source, "per-class", 4, 2, seed=5) == split_per_class(labels, 4, 2, seed=5)
    kept = split_source(source, n_train=4, n_query=2, train_in_database=True)
    assert kept == split_per_class(labels, 4, 2, train_in_database=True)
    with pytest.raises(ValueError, match="class 'a' \\(index 0\\) has 10 items"):
        split_source(source, n_train=9, n_query=2)
    multi_hot = np.eye(3, dtype=np.uint8)[labels] | np.eye(3, dtype=np.uint8)[(labels + 1) % 3]
    tagged = Source(None, multi_hot, ["a", "b", "c"], "list-file", "tags.txt")
    assert split_source(tagged, "nus-wide", 8, 5, seed=2) == split_nus_wide(30, 5, 8, seed=2)
    with pytest.raises(ValueError, match="tags.txt is multi-label: .* --protocol nus-wide"):
        split_source(tagged, "per-class", 2, 1)
    with pytest.raises(ValueError, match="protocol must be one of"):
        split_source(source, "imagenet")


@pytest.mark.parametrize(
    ("value", "shown"), [(1e30, "1e+30"), (1.5, "1.5"), ("3", "'3'"), (True, "True"), (-2, "-2")]
)
def test_load_refuses_rows_that_are_no_row_numbers(tmp_path: Path, value, shown) -> None:
    """JSON can hold 1e30, 1.5, "3" or true where a row number belongs: each is refused with
    a sentence naming the entry (1e30 was a traceback, 1.5 and "3" were silently cast)."""
    path = tmp_path / "split.json"
    meta = {"format": "dpq-split", "version": 1, "train": [0], "query": [1]}
    path.write_text(json.dumps({**meta, "database": [2, value]}))
    with pytest.raises(ValueError, match=rf"database\[1\] is {re.escape(shown)}, not a row number"):
        Split.load(path)
    path.write_text(json.dumps({**meta, "database": [2, 2**63]}))  # beyond int64
    with pytest.raises(ValueError, match=r"database\[1\] is 9223372036854775808"):
        Split.load(path)
    floats = tmp_path / "split.npz"
    np.savez(
        floats, train=[0], query=[1], database=np.array([2.0]), meta=np.array(json.dumps(meta))
    )
    with pytest.raises(ValueError, match="database holds float64 values, not row numbers"):
        Split.load(floats)


def test_an_empty_subset_is_an_error_naming_it() -> None:
    split = Split(train=[0, 1], query=[2], database=[])
    assert split.rows("train", 5).tolist() == [0, 1]
    with pytest.raises(ValueError, match="the split holds no database rows"):
        split.rows("database", 5)
