"""Tests for dpq.data.labels (word-vector label embeddings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dpq.data.labels import load_word_vectors

WORDVEC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wordvec"


@pytest.mark.skipif(not WORDVEC.is_dir(), reason=f"shared word vectors not found at {WORDVEC}")
def test_shared_cifar10_word_vectors() -> None:
    vectors = load_word_vectors(WORDVEC / "cifar10.txt", num_classes=10, dim=300)
    assert vectors.shape == (10, 300) and vectors.dtype == np.float32
    assert np.isclose(vectors[0, 0], 0.1689453125)
    with pytest.raises(ValueError, match="has 21 rows but the dataset has 10 classes"):
        load_word_vectors(WORDVEC / "nus21.txt", num_classes=10)


def test_bad_word_vector_files(tmp_path: Path) -> None:
    path = tmp_path / "vec.txt"
    path.write_text("1 2 3\n4 5 6\n")
    assert load_word_vectors(path).shape == (2, 3)
    with pytest.raises(ValueError, match="has 2 rows but the dataset has 3 classes"):
        load_word_vectors(path, num_classes=3)
    with pytest.raises(ValueError, match="length 3 but 300"):
        load_word_vectors(path, dim=300)


@pytest.mark.parametrize(
    "text, message",
    [
        ("1 2 3\n4 5\n", "line 2 .* 2 values but the first row has 3"),
        ("1 2 x\n", "line 1 .* holds 'x', which is not a number"),
        ("1 nan 3\n", "NaN"),
        ("\n", "empty"),
    ],
)
def test_malformed_word_vector_files_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "vec.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_word_vectors(path)


def test_word_vector_messages_name_the_file_and_stay_short(tmp_path: Path) -> None:
    binary = tmp_path / "vectors.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"vectors\.bin is not a text file"):
        load_word_vectors(binary)
    csv = tmp_path / "vectors.csv"
    csv.write_text(",".join(["0.5"] * 300) + "\n")
    with pytest.raises(ValueError, match="commas are not separators") as caught:
        load_word_vectors(csv)
    assert len(str(caught.value)) < 400 and "vectors.csv" in str(caught.value)
    zero = tmp_path / "zero.txt"
    zero.write_text("1 2 3\n0 0 0\n")
    with pytest.raises(ValueError, match=r"row 2 of word-vector file .*zero\.txt is all zeros"):
        load_word_vectors(zero)
    with pytest.raises(ValueError, match="is a directory"):
        load_word_vectors(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_word_vectors(tmp_path / "missing.txt")


def test_resolve_word_vectors_by_file_or_orthogonal(tmp_path: Path) -> None:
    from dpq.data import orthogonal_label_embeddings, resolve_word_vectors

    assert resolve_word_vectors(None, 3, 4) is None
    vectors = resolve_word_vectors("orthogonal", 3, 4, seed=2)
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(3), atol=1e-6)
    np.testing.assert_array_equal(vectors, orthogonal_label_embeddings(3, 4, seed=2))
    path = tmp_path / "v.txt"
    path.write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n")
    assert resolve_word_vectors(path, 3, 4).shape == (3, 4)
    with pytest.raises(ValueError, match="dim >= num_classes"):
        resolve_word_vectors("orthogonal", 5, 4)
