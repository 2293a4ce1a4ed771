"""dpq.serve.searches: queries searched together get exactly the answers they get alone
(tie order and tie groups included), a batch key keeps apart what must not share a search,
one query's failure leaves the others' answers; and over HTTP (uvicorn on 127.0.0.1), many
concurrent single searches, batched by the service, answer as each does alone."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from dpq.index import DPQIndex  # noqa: E402
from dpq.serve import ServeSettings, create_app, running  # noqa: E402
from dpq.serve.schemas import SearchRequest  # noqa: E402
from dpq.serve.searches import SearchQuery, answer_queries, batch_key  # noqa: E402

LEVELS, K, DIM, ITEMS = 4, 16, 8, 3000


@pytest.fixture(scope="module")
def index_path(tmp_path_factory) -> Path:
    """3,000 items of 4 random codes out of 16 (4 bits a level, so at 4 bits groups of
    ~190 items tie), labelled with 5 classes."""
    rng = np.random.default_rng(0)
    books = np.stack([rng.normal(scale=0.5**level, size=(K, DIM)) for level in range(LEVELS)])
    classes = ["ant", "bee", "cat", "dog", "eel"]
    index = DPQIndex(books.astype(np.float32), metadata={"classes": classes})
    index.add(rng.integers(0, K, size=(ITEMS, LEVELS)), labels=rng.integers(0, 5, size=ITEMS))
    return index.save(tmp_path_factory.mktemp("searches") / "db.index.npz")


def _vectors(count: int, seed: int) -> list[list[float]]:
    return np.random.default_rng(seed).normal(size=(count, DIM)).round(4).tolist()


# Settings that must each be searched apart, several queries each (vectors, or ids).
SETTINGS: list[dict] = [
    {"k": 10},
    {"k": 10, "bits": 4},  # big tie groups
    {"k": 6, "offset": 7, "bits": 8},
    {"k": 5, "bits": 4, "filter": {"labels": ["cat", "eel"]}},
    {"k": 5, "exclude": [1, 2, 3, 4, 5, 6, 7, 8]},
    {"k": 8, "bits": 16, "rerank": 8, "rerank_candidates": 40},
    {"k": 3, "with_codes": True},
]
ID_SETTINGS: list[dict] = [
    {"k": 7, "bits": 8},
    {"k": 7, "bits": 8, "exclude_query": False},
    {"k": 7, "bits": 8, "exclude": [11, 22]},  # the first id query excludes itself twice
]


def _requests() -> list[dict]:
    out = []
    for number, options in enumerate(SETTINGS):
        out += [{"vector": v, **options} for v in _vectors(5, seed=number)]
    for options in ID_SETTINGS:
        out += [{"id": item, **options} for item in (11, 500, 2999, 1234)]
    return out


def _without_time(body: dict) -> dict:
    return {name: value for name, value in body.items() if name != "took_ms"}


def test_the_batch_key_separates_what_changes_a_page():
    def key(**fields) -> str:
        return batch_key(SearchRequest.model_validate(fields))

    assert key(vector=[1.0], k=5) == key(vector=[2.0], k=5) == key(image="aGk=", k=5)
    assert key(id=3, k=5, exclude_query=False) == key(vector=[1.0], k=5)
    assert key(id=3, k=5, exclude=[3]) == key(vector=[1.0], k=5, exclude=[3])
    assert key(id=3, k=5) == key(id=4, k=5) != key(vector=[1.0], k=5)
    for other in ({"k": 6}, {"offset": 1}, {"bits": 8}, {"nprobe": 2}, {"with_codes": True},
                  {"filter": {"labels": ["cat"]}}, {"exclude": [9]},
                  {"rerank": 8, "rerank_candidates": 50}):  # fmt: skip
        assert key(vector=[1.0], k=5) != key(vector=[1.0], **{"k": 5, **other}), other


def test_queries_searched_together_answer_as_each_alone(index_path, tmp_path):
    app = create_app(ServeSettings(index_path, threads=2))
    service = app.state.service
    try:
        groups: dict[str, list[SearchQuery]] = {}
        for body in _requests():
            params = SearchRequest.model_validate(body)
            groups.setdefault(batch_key(params), []).append(SearchQuery(params, 0.0))
        # id 11 with exclude [11, 22] adds no exclusion of its own: a group apart
        assert len(groups) == len(SETTINGS) + len(ID_SETTINGS) + 1
        for queries in groups.values():
            alone = [answer_queries(service, [query])[0] for query in queries]
            together = answer_queries(service, queries)
            assert [_without_time(a) for a in together] == [_without_time(a) for a in alone]
        tied = answer_queries(service, groups[batch_key(SearchRequest(vector=[0.0], k=10, bits=4))])
        assert all(answer["tie_groups"] for answer in tied)  # the tie order was put to the test
    finally:
        service.close()


def test_one_query_failing_leaves_the_others_answers(index_path, monkeypatch):
    """An unknown id, a vector of the wrong length, one whose distances overflow float32
    (the search of the group fails, then each query is searched alone) and one whose page
    cannot be written out each get their own error; the others their answers."""
    app = create_app(ServeSettings(index_path, threads=2))
    service = app.state.service
    try:
        good = [SearchRequest(vector=v, k=4) for v in _vectors(4, seed=9)]
        alone = [answer_queries(service, [SearchQuery(p, 0.0)])[0] for p in good]
        shown = [{r["id"] for r in answer["results"]} for answer in alone]
        broken = min(shown[1] - shown[0] - shown[2] - shown[3])  # on query 1's page only
        real = service.collection.has_image

        def has_image(item_id: int) -> bool:
            if item_id == broken:
                raise RuntimeError("the thumbnail store is gone")
            return real(item_id)

        monkeypatch.setattr(service.collection, "has_image", has_image)
        bad = [
            SearchRequest(id=10**9, k=4, exclude_query=False),
            SearchRequest(vector=[1.0, 2.0], k=4),
            SearchRequest(vector=[1e30] * DIM, k=4),
        ]
        queries = [SearchQuery(p, 0.0) for p in [good[0], bad[0], good[1], bad[1], *good[2:]]]
        answers = answer_queries(service, [*queries, SearchQuery(bad[2], 0.0)])
    finally:
        service.close()
    assert [_without_time(a) for a in (answers[0], answers[4], answers[5])] == [
        _without_time(a) for a in (alone[0], alone[2], alone[3])
    ]
    assert isinstance(answers[2], RuntimeError) and "thumbnail store" in str(answers[2])
    assert "no item with id 1000000000" in str(answers[1])
    assert isinstance(answers[3], ValueError) and "has 2 values" in str(answers[3])
    assert isinstance(answers[6], ValueError) and "overflow 32-bit floats" in str(answers[6])


def _pending(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("dpq_pending "):
            return float(line.split()[1])
    raise AssertionError("/metrics has no dpq_pending")


def _batch_counts(client: httpx.Client) -> tuple[float, float]:
    """(index searches, queries in them) of single searches, from /metrics."""
    values = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(("dpq_search_batch_queries_count", "dpq_search_batch_queries_sum")):
            name, value = line.split()
            values[name.rsplit("_", 1)[1]] = float(value)
    return values.get("count", 0.0), values.get("sum", 0.0)


def test_concurrent_searches_are_batched_and_answer_as_alone(index_path):
    """All requests sent at once while searches are held off (the collection's write lock,
    as a long write would), so they wait in the batcher together; once let go, they are
    searched in groups, and each answer equals the one the request gets alone. Bad queries
    in the same groups get their own errors."""
    requests = _requests()
    bad = [({"id": 10**9, "k": 10}, 404), ({"vector": [1.0], "k": 10}, 422),
           ({"vector": [1e30] * DIM, "k": 10}, 422)]  # fmt: skip
    app = create_app(ServeSettings(index_path, threads=2, batch_max=8, batch_wait_ms=1.0))
    collection = app.state.service.collection
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        alone = []
        for body in requests:  # one at a time: an idle service searches each alone
            answer = client.post("/search", json=body)
            assert answer.status_code == 200, answer.text
            alone.append(_without_time(answer.json()))
        searches_alone, queries_alone = _batch_counts(client)
        assert searches_alone == queries_alone == len(requests)
        sent = [*requests, *(body for body, _ in bad)]
        with ThreadPoolExecutor(len(sent)) as pool:  # every request in flight at once
            with collection._lock.writing():
                futures = [pool.submit(client.post, "/search", json=body) for body in sent]
                deadline = time.monotonic() + 20
                while _pending(client) < len(sent):
                    assert time.monotonic() < deadline, "the requests never all arrived"
                    time.sleep(0.01)
            answers = [future.result(timeout=30) for future in futures]
        searches, queries = _batch_counts(client)
    assert [a.status_code for a in answers] == [200] * len(requests) + [s for _, s in bad]
    assert [_without_time(a.json()) for a in answers[: len(requests)]] == alone
    assert queries - queries_alone == len(requests) + 1  # the unknown id never reached the index
    assert searches - searches_alone < len(requests) / 2  # several queries per index search


def test_shutdown_answers_the_searches_still_waiting(index_path):
    """Searches waiting in the batcher when the app shuts down are searched and answered
    before the workers stop."""
    app = create_app(ServeSettings(index_path, threads=1, batch_wait_ms=1000.0))
    service = app.state.service
    queries = [SearchQuery(SearchRequest(vector=v, k=3), 0.0) for v in _vectors(6, seed=4)]
    alone = [_without_time(answer_queries(service, [query])[0]) for query in queries]
    key = batch_key(queries[0].params)

    async def scenario() -> list[dict]:
        with service.collection._lock.writing():  # the first search holds the only slot
            tasks = [asyncio.ensure_future(service.searches.submit(key, q)) for q in queries]
            for _ in range(400):  # bounded: until the five behind the first wait in the queue
                if len(service.searches.queue) == len(queries) - 1:
                    break
                await asyncio.sleep(0.005)
            assert len(service.searches.queue) == len(queries) - 1
            shutdown = asyncio.ensure_future(service.shutdown())
            await asyncio.sleep(0)
        await asyncio.wait_for(shutdown, 20)
        return [_without_time(answer) for answer in await asyncio.gather(*tasks)]

    assert asyncio.run(scenario()) == alone
    with pytest.raises(RuntimeError):  # the workers stopped after the answers
        service.workers.search_pool.submit(int)
