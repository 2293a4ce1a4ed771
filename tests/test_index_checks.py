"""dpq.index.checks alone: the one k check (bounds, types, names in messages), the
prefix-length check and the ids check; importable with numpy alone."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dpq.index.checks import MAX_K, check_ids, check_k, check_num_levels


@pytest.mark.parametrize("k", [1, 7, MAX_K, np.int64(3), np.uint8(200)])
def test_check_k_returns_a_plain_int(k):
    out = check_k(k)
    assert out == int(k) and type(out) is int


@pytest.mark.parametrize("k", [True, False, 2.0, "3", None, np.float32(3)])
def test_check_k_refuses_what_is_not_an_int(k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        check_k(k)


@pytest.mark.parametrize("k", [0, -1, np.int64(-5)])
def test_check_k_refuses_below_one(k):
    with pytest.raises(ValueError, match=rf"k must be a positive integer; got k={int(k)}"):
        check_k(k)


def test_check_k_refuses_beyond_max_k_and_names_the_argument():
    with pytest.raises(ValueError, match=rf"k={MAX_K + 1} is beyond the largest accepted value"):
        check_k(MAX_K + 1)
    with pytest.raises(ValueError, match="nprobe must be a positive integer; got nprobe=0"):
        check_k(0, "nprobe")


def test_check_num_levels_fills_none_and_names_the_bounds():
    assert check_num_levels(None, 4, 256) == 4
    assert check_num_levels(np.int32(2), 4, 256) == 2
    with pytest.raises(
        ValueError,
        match=r"num_levels must be in 1\.\.4 \(this index has 4 levels of 8 bits\); got 5",
    ):
        check_num_levels(5, 4, 256)
    with pytest.raises(ValueError, match=r"rerank_from must be an integer in 1\.\.4; got True"):
        check_num_levels(True, 4, 256, "rerank_from")


def test_ids_of_new_items_are_unique_non_negative_integers():
    np.testing.assert_array_equal(check_ids([3, 1, 2], 3), [3, 1, 2])
    with pytest.raises(ValueError, match="unique"):
        check_ids([1, 1], 2)
    with pytest.raises(ValueError, match=">= 0"):
        check_ids([0, -1], 2)
    with pytest.raises(ValueError, match="int \\(n,\\) with n = 3"):
        check_ids([0.5, 1.0, 2.0], 3)


def test_checks_import_with_numpy_alone():
    code = (
        "import sys, dpq.index.checks; "
        "assert not {'numba', 'faiss', 'torch'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
