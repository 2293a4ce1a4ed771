"""dpq.serve.ranking alone: the tie order (a hash of query and id, unrelated to ids), tie
groups, pages that continue each other, and over-fetching for filters and exclusions, on a
brute-force search over fixed distances and on a tiny DPQIndex with forced ties."""

from __future__ import annotations

import numpy as np
import pytest

from dpq.index import DPQIndex
from dpq.serve.labels import LabelFilter
from dpq.serve.ranking import TieGroup, rank_pages, search_pages, tie_keys, tie_seed


class BruteForce:
    """search(queries, fetch) over fixed distances float32 (nq, N) of items 0..N-1 (only
    ``reachable`` of them, the rest as an nprobe search leaves them: -1), nearest first,
    ties by id (as DPQIndex orders them); counts its calls and the largest fetch."""

    def __init__(self, distances: np.ndarray, reachable: int | None = None) -> None:
        self.distances = np.asarray(distances, np.float32)
        self.reachable = reachable or self.distances.shape[1]
        self.calls: list[int] = []

    def __call__(self, rows: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(fetch)
        width = min(fetch, self.distances.shape[1])
        out_d = np.full((len(rows), width), np.inf, np.float32)
        out_i = np.full((len(rows), width), -1, np.int64)
        for row, query in enumerate(rows.tolist()):
            scores = self.distances[query, : self.reachable]
            order = np.lexsort((np.arange(len(scores)), scores))[:width]
            out_d[row, : len(order)], out_i[row, : len(order)] = scores[order], order
        return out_d, out_i


def test_tie_keys_are_deterministic_and_unrelated_to_ids():
    ids = np.arange(5000)
    keys = tie_keys(ids, 12345)
    assert keys.dtype == np.uint64 and len(np.unique(keys)) == 5000
    assert np.array_equal(keys, tie_keys(ids, 12345))
    ranks = np.argsort(np.argsort(keys))
    assert abs(np.corrcoef(ranks, ids)[0, 1]) < 0.05  # no trend with the id
    assert not np.array_equal(np.argsort(keys), np.argsort(tie_keys(ids, 54321)))
    vector = np.array([0.5, -1.0], np.float32)
    assert tie_seed(vector) == tie_seed(vector.copy()) != tie_seed(vector + 1e-3)


def _tie_order(ids: np.ndarray, seed: int) -> list[int]:
    return ids[np.argsort(tie_keys(ids, seed), kind="stable")].tolist()


def test_ties_are_ordered_by_the_hash_and_their_groups_reported():
    distances = np.array([[0, 1, 1, 1, 1, 1, 2, 3, 3, 4]], np.float32)
    search = BruteForce(distances)
    page = rank_pages(search, 1, offset=0, k=3, seeds=[7], limit=10)[0]
    tied = _tie_order(np.arange(1, 6), 7)
    assert page.ids.tolist() == [0, *tied[:2]]
    assert page.tie_groups == [TieGroup(1, 6, 1.0, True)]  # the whole group, past the page
    # k + 1 first (the extra one shows the page's last group goes on), then until it closed
    assert search.calls == [4, 10]
    pages = [rank_pages(search, 1, offset, 2, [7], 10)[0] for offset in range(0, 10, 2)]
    whole = np.concatenate([p.ids for p in pages]).tolist()
    assert whole == [0, *tied, 6, *_tie_order(np.array([7, 8]), 7), 9]  # pages continue
    assert pages[3].tie_groups == pages[4].tie_groups == [TieGroup(7, 9, 3.0, True)]
    assert pages[0].tie_groups == [TieGroup(1, 6, 1.0, True)]  # a group of one is no tie


def test_a_group_followed_beyond_the_window_is_reported_incomplete():
    distances = np.zeros((1, 40), np.float32)
    page = rank_pages(BruteForce(distances), 1, 0, 5, [1], limit=40, tie_window=8)[0]
    # fetched 6, then 24 >= the window: the group reaches at least rank 23, maybe further
    assert len(page.ids) == 5 and page.tie_groups == [TieGroup(0, 24, 0.0, False)]
    whole = rank_pages(BruteForce(distances), 1, 0, 5, [1], limit=40)[0]
    assert whole.tie_groups == [TieGroup(0, 40, 0.0, True)]


def test_a_filter_still_gives_k_results_when_k_exist():
    rng = np.random.default_rng(0)
    distances = np.sort(rng.random((2, 1000)).astype(np.float32), axis=1)
    search = BruteForce(distances)
    wanted = np.arange(1000) >= 900  # the 100 farthest items only

    def keep(ids: np.ndarray, query: int) -> np.ndarray:
        return wanted[np.maximum(ids, 0)] & (ids != 950 + query)

    pages = rank_pages(search, 2, 0, 20, [1, 2], limit=1000, keep=keep)
    for query, page in enumerate(pages):
        expected = [i for i in range(900, 1000) if i != 950 + query][:20]
        assert page.ids.tolist() == expected
    assert len(search.calls) <= 1 + np.ceil(np.log(1000 / 20) / np.log(4))  # bounded rounds
    few = rank_pages(BruteForce(distances), 1, 0, 20, [1], 1000, keep=lambda i, q: i % 333 == 1)
    assert few[0].ids.tolist() == [1, 334, 667]  # fewer exist: all of them, then stop
    probed = rank_pages(BruteForce(distances, reachable=30), 1, 0, 20, [1], 1000, keep=keep)
    assert probed[0].ids.tolist() == []  # none reachable (an nprobe search): no endless loop


def _tied_index() -> DPQIndex:
    """12 items, codes chosen so that items 0..5 share one code and 6..11 another:
    every search ties them in two groups of 6."""
    books = np.zeros((2, 4, 2), np.float32)
    books[0, 1] = (1.0, 0.0)
    books[0, 2] = (0.0, 5.0)
    index = DPQIndex(books)
    codes = np.array([[1, 0]] * 6 + [[2, 0]] * 6, np.uint8)
    index.add(codes, labels=np.arange(12) % 3)
    return index


def test_search_pages_on_an_index_with_forced_ties():
    index = _tied_index()
    query = np.array([[1.0, 0.0]], np.float32)
    (page,), matching = search_pages(index, query, k=8, offset=0, levels=2)
    assert matching is None
    seed = tie_seed(query[0])
    assert (
        page.ids.tolist() == _tie_order(np.arange(6), seed) + _tie_order(np.arange(6, 12), seed)[:2]
    )
    assert [(g.start, g.end, g.complete) for g in page.tie_groups] == [(0, 6, True), (6, 12, True)]
    only = LabelFilter(np.array([1]), "any")
    (filtered,), matching = search_pages(
        index, query, 3, 0, levels=2, label_filter=only, excluded=[np.array([4])]
    )
    assert matching == 4 and filtered.ids.tolist() == [1, 7, 10][:1] + _tie_order(
        np.array([7, 10]), seed
    )
    with pytest.raises(ValueError, match="overflow 32-bit floats"):
        search_pages(index, np.full((1, 2), 3e38, np.float32), 3, 0, levels=2)
    with pytest.raises(ValueError, match="nprobe needs a partitioned index.*request's nprobe"):
        search_pages(index, query, 3, 0, levels=2, options={"nprobe": 2})
    with pytest.raises(ValueError, match="does not take the search option 'colour'"):
        search_pages(index, query, 3, 0, levels=2, options={"colour": 2})
