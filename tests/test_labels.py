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
    path.write_text("1 2 3\n4 5\n")
    with pytest.raises(ValueError, match="line 2 .* 2 values but the first row has 3"):
        load_word_vectors(path)
    path.write_text("1 2 x\n")
    with pytest.raises(ValueError, match="line 1 .* not all numbers"):
        load_word_vectors(path)
    path.write_text("1 nan 3\n")
    with pytest.raises(ValueError, match="NaN"):
        load_word_vectors(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_word_vectors(path)
