"""dpq.serve.fast_search: a JSON search answered beside FastAPI's routing gets the answer,
the errors and the metrics the route gives (over HTTP, uvicorn on 127.0.0.1); anything else
still reaches the route."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from fastapi import Request  # noqa: E402

from dpq.index import DPQIndex  # noqa: E402
from dpq.serve import ServeSettings, create_app, running  # noqa: E402
from dpq.serve.context import service_context  # noqa: E402

DIM = 8


@pytest.fixture(scope="module")
def index_path(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    books = np.stack([rng.normal(scale=0.5**level, size=(16, DIM)) for level in range(3)])
    index = DPQIndex(books.astype(np.float32), metadata={"classes": ["ant", "bee", "cat"]})
    index.add(rng.integers(0, 16, size=(500, 3)), labels=rng.integers(0, 3, size=500))
    return index.save(tmp_path_factory.mktemp("fast") / "db.index.npz")


def _without_time(body: dict) -> dict:
    return {name: value for name, value in body.items() if name != "took_ms"}


def _responses(client: httpx.Client, status: int) -> float:
    """dpq_responses for POST /search with ``status``, from /metrics."""
    wanted = f'dpq_responses_total{{endpoint="/search",method="POST",status="{status}"}}'
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(wanted):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def served(index_path):
    """The app, its URL and a client; the route's dependency counts the requests that
    reached the FastAPI route (the fast path needs none)."""
    app = create_app(ServeSettings(index_path, fsync=False), log=lambda _message: None)
    routed = []

    async def counted(request: Request):
        routed.append(request.url.path)
        return request.app.state.service

    app.dependency_overrides[service_context] = counted
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, routed


def test_a_json_search_skips_the_route_and_answers_as_the_route_does(served):
    client, routed = served
    vector = np.random.default_rng(1).normal(size=DIM).round(4).tolist()
    fields = {"k": 7, "bits": 8, "filter": {"labels": ["bee", "cat"]}, "exclude": [3, 4]}
    fast = client.post("/search", json={"vector": vector, **fields})
    assert fast.status_code == 200 and fast.headers["content-type"] == "application/json"
    assert routed == []  # answered before FastAPI's routing
    by_id = client.post("/search", json={"id": 5, "k": 4})
    form = {"id": "5", "k": "4"}  # the same query as a multipart form: the route answers it
    routed_answer = client.post("/search", data=form, files={"unused": ("x", b"", "text/plain")})
    assert routed == ["/search"]
    assert routed_answer.status_code == 200, routed_answer.text
    assert _without_time(by_id.json()) == _without_time(routed_answer.json())
    found = [result["id"] for result in fast.json()["results"]]
    assert len(found) == 7 and not {3, 4} & set(found)  # the options were applied
    assert _responses(client, 200) == 3  # the metrics name the route either way


@pytest.mark.parametrize(
    ("body", "status", "phrase", "reaches_route"),
    [
        (b'{"id": 1, "k": ', 422, "not valid JSON", True),  # refused before a search
        (b'{"id": 1, "k": "5"}', 422, "valid integer", True),
        (b'{"k": 5}', 422, "give exactly one query", False),  # refused by the search
        (b'{"id": 1000000, "k": 5}', 404, "1000000", False),
        (b'{"vector": [1.0, 2.0], "k": 5}', 422, "expects 8", False),
    ],
)
def test_refusals_keep_the_routes_status_and_words(served, body, status, phrase, reaches_route):
    client, routed = served
    answer = client.post("/search", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert phrase in answer.text
    assert routed == (["/search"] if reaches_route else [])
    assert _responses(client, status) == 1


def test_other_requests_reach_the_app(served):
    client, routed = served
    plain = client.post("/search", content=b'{"id": 1}', headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and routed == ["/search"]
    batch = client.post("/search/batch", json={"queries": [{"id": 1}], "k": 2})
    assert batch.status_code == 200 and routed == ["/search", "/search/batch"]
    assert client.get("/search").status_code == 405
