"""dpq.index.codebooks alone: codebook checks and digest, greedy residual encoding against
an exhaustive per-level choice, decoding against summed codewords."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shrinking_codebooks
from dpq.index.codebooks import (
    check_codebooks,
    code_dtype,
    codebooks_sha256,
    decode,
    greedy_residual_encode,
)


@pytest.fixture
def books() -> np.ndarray:
    return shrinking_codebooks(3, 12, 5)


def test_check_codebooks_returns_contiguous_float32_and_names_bad_input(books):
    out = check_codebooks(books.astype(np.float64)[:, :, ::-1])
    assert out.dtype == np.float32 and out.flags.c_contiguous
    for bad, message in (
        (np.zeros((2, 3)), "3-D"),
        (np.zeros((2, 3, 4), np.int64), "floating point"),
        (np.zeros((0, 3, 4)), "no empty axis"),
        (np.zeros((1, 65537, 1)), "at most 65536"),
        (np.full((1, 2, 2), np.inf), "NaN or inf"),
    ):
        with pytest.raises(ValueError, match=message):
            check_codebooks(bad)


def test_code_dtype_and_digest(books):
    assert code_dtype(256) == np.uint8 and code_dtype(257) == np.uint16
    assert codebooks_sha256(books) == codebooks_sha256(books.astype(np.float64))
    changed = books.copy()
    changed[1, 2, 3] += 1e-6
    assert codebooks_sha256(changed) != codebooks_sha256(books)


def test_greedy_encoding_picks_the_nearest_codeword_of_each_residual(books):
    x = np.random.default_rng(1).standard_normal((40, 5)).astype(np.float32)
    codes = greedy_residual_encode(x, books)
    assert codes.dtype == np.uint8 and codes.shape == (40, 3)
    residual = x.astype(np.float64)
    for level in range(3):
        dist = ((residual[:, None, :] - books[level][None].astype(np.float64)) ** 2).sum(-1)
        best = dist[np.arange(40), codes[:, level]]
        assert np.all(best <= dist.min(axis=1) + 1e-5)
        residual -= books[level][codes[:, level]]
    np.testing.assert_array_equal(greedy_residual_encode(x, books, num_levels=2), codes[:, :2])
    with pytest.raises(ValueError, match="num_levels must be in 1..3"):
        greedy_residual_encode(x, books, num_levels=4)
    with pytest.raises(ValueError, match="assignment must be one of"):
        greedy_residual_encode(x, books, assignment="manhattan")


def test_decode_sums_the_chosen_codewords(books):
    codes = np.array([[0, 1, 2], [11, 0, 5]])
    expected = books[0][codes[:, 0]] + books[1][codes[:, 1]] + books[2][codes[:, 2]]
    np.testing.assert_allclose(decode(codes, books), expected, rtol=1e-6)
    np.testing.assert_allclose(decode(codes[:, :1], books), books[0][codes[:, 0]])
