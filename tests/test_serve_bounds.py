"""dpq.serve.bounds: one set of request bounds, within the index's own, checked the same way
by the schemas and by Collection.search."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")

from dpq.index import MAX_K, DPQIndex  # noqa: E402
from dpq.serve import ServeSettings, open_collection  # noqa: E402
from dpq.serve.bounds import (
    MAX_NPROBE,
    MAX_OFFSET,
    MAX_RERANK_CANDIDATES,
    MAX_RESULTS,
    CodeLengths,  # noqa: E402
    check_search_bounds,
)


def test_bounds_lie_within_the_index_contract():
    assert 1 <= MAX_RESULTS <= MAX_K and 1 <= MAX_RERANK_CANDIDATES <= MAX_K
    assert MAX_NPROBE == MAX_K


def test_edges_pass():
    check_search_bounds(1, 0)
    check_search_bounds(MAX_RESULTS, MAX_OFFSET, MAX_RERANK_CANDIDATES, MAX_NPROBE)


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        ((0, 0), f"k must be in 1..{MAX_RESULTS}; got 0"),
        ((MAX_RESULTS + 1, 0), f"k must be in 1..{MAX_RESULTS}"),
        ((2.0, 0), "k must be an integer"),
        ((True, 0), "k must be an integer"),
        ((5, -1), f"offset must be in 0..{MAX_OFFSET}; got -1"),
        ((5, MAX_OFFSET + 1), "offset must be in"),
        ((5, 0, 0), "rerank_candidates must be in"),
        ((5, 0, MAX_RERANK_CANDIDATES + 1), "rerank_candidates must be in"),
        ((5, 0, None, 0), "nprobe must be in"),
    ],
)
def test_out_of_bounds_is_refused(args, phrase):
    with pytest.raises(ValueError, match=phrase.replace("(", r"\(")):
        check_search_bounds(*args)


def test_collection_search_checks_the_same_bounds(tmp_path):
    rng = np.random.default_rng(0)
    index = DPQIndex(rng.normal(size=(2, 4, 3)).astype(np.float32))
    index.add_features(rng.normal(size=(20, 3)).astype(np.float32))
    collection = open_collection(ServeSettings(index.save(tmp_path / "t.index.npz"), fsync=False))
    try:
        query = np.zeros(3, np.float32)
        assert len(collection.search(query, k=MAX_RESULTS).ids) == 20  # the edge is served
        with pytest.raises(ValueError, match=f"k must be in 1..{MAX_RESULTS}"):
            collection.search(query, k=MAX_RESULTS + 1)
        with pytest.raises(ValueError, match="offset must be in"):
            collection.search(query, k=5, offset=MAX_OFFSET + 1)
    finally:
        collection.close()


def test_code_lengths_of_an_index():
    lengths = CodeLengths.of(num_levels=4, codebook_size=256)
    assert lengths.bits == [8, 16, 24, 32] and lengths.levels(None) == 4
    assert lengths.levels(16) == 2 and lengths.rerank_levels(None, 4) is None
    assert lengths.rerank_levels(8, 3) == 1
    with pytest.raises(ValueError, match=r"bits must be one of \[8, 16, 24, 32\]"):
        lengths.levels(12)
    with pytest.raises(ValueError, match="bits must be an integer"):
        lengths.levels(True)
    with pytest.raises(ValueError, match="rerank must be shorter than bits=16"):
        lengths.rerank_levels(16, 2)
    assert CodeLengths.of(2, 16).bits == [4, 8]
