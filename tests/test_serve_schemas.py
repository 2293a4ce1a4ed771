"""dpq.serve.schemas: the request bodies' bounds and their OpenAPI description (every
``$ref`` of the app's description resolves, the request models included)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")

from pydantic import ValidationError  # noqa: E402

from dpq.index import DPQIndex  # noqa: E402
from dpq.serve import ServeSettings, create_app  # noqa: E402
from dpq.serve.bounds import (  # noqa: E402
    MAX_IMAGES_PER_REQUEST,
    MAX_OFFSET,
    MAX_QUERIES_PER_REQUEST,
    MAX_RERANK_CANDIDATES,
    MAX_RESULTS,
    MAX_VECTORS_PER_REQUEST,
)
from dpq.serve.schemas import (  # noqa: E402
    REQUEST_MODELS,
    AddRequest,
    BatchSearchRequest,
    SearchRequest,
    request_schemas,
)


def _refs(node: Any) -> list[str]:
    """Every "$ref" value anywhere in a JSON document."""
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    """The target of a local JSON pointer ("#/a/b"); KeyError when it dangles."""
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


@pytest.fixture(scope="module")
def openapi(tmp_path_factory) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    index = DPQIndex(rng.normal(size=(2, 4, 3)).astype(np.float32))
    index.add_features(rng.normal(size=(10, 3)).astype(np.float32))
    path = index.save(tmp_path_factory.mktemp("schemas") / "tiny.index.npz")
    app = create_app(ServeSettings(path, fsync=False), log=lambda _message: None)
    return app.openapi()


def test_every_ref_of_the_description_resolves(openapi):
    refs = set(_refs(openapi))
    assert "#/components/schemas/SearchRequest" in refs  # the routes' request bodies
    assert "#/components/schemas/AddRequest" in refs
    dangling = []
    for ref in sorted(refs):
        try:
            _resolve(openapi, ref)
        except KeyError:
            dangling.append(ref)
    assert dangling == []


def test_request_models_are_described_with_their_bounds(openapi):
    components = openapi["components"]["schemas"]
    for model in REQUEST_MODELS:
        assert components[model.__name__]["title"] == model.__name__
    search = components["SearchRequest"]["properties"]
    assert (search["k"]["minimum"], search["k"]["maximum"]) == (1, MAX_RESULTS)
    assert search["offset"]["maximum"] == MAX_OFFSET
    add = components["AddRequest"]["properties"]
    assert add["images"]["anyOf"][0]["maxItems"] == MAX_IMAGES_PER_REQUEST
    assert add["vectors"]["anyOf"][0]["maxItems"] == MAX_VECTORS_PER_REQUEST
    described = request_schemas()
    assert set(described) == {
        "SearchRequest", "BatchSearchRequest", "AddRequest", "Filter", "BatchQuery"
    }  # fmt: skip
    # the models they refer to come along, and their $ref point into the components
    assert {ref.rsplit("/", 1)[1] for ref in _refs(described)} <= set(described)


@pytest.mark.parametrize(
    ("fields", "phrase"),
    [
        ({"k": 0}, "greater than or equal to 1"),
        ({"k": MAX_RESULTS + 1}, f"less than or equal to {MAX_RESULTS}"),
        ({"offset": -1}, "greater than or equal to 0"),
        ({"offset": MAX_OFFSET + 1}, f"less than or equal to {MAX_OFFSET}"),
        ({"rerank_candidates": MAX_RERANK_CANDIDATES + 1}, "less than or equal to"),
        ({"nprobe": 0}, "greater than or equal to 1"),
        ({"colour": "red"}, "Extra inputs are not permitted"),
    ],
)
def test_search_request_refuses_what_is_out_of_bounds(fields, phrase):
    with pytest.raises(ValidationError, match=phrase):
        SearchRequest.model_validate({"id": 1, **fields})


def test_search_request_takes_its_bounds_and_defaults():
    edge = SearchRequest(id=1, k=MAX_RESULTS, offset=MAX_OFFSET)
    assert (edge.k, edge.offset) == (MAX_RESULTS, MAX_OFFSET)
    plain = SearchRequest(id=1)
    assert (plain.k, plain.offset, plain.bits, plain.nprobe) == (20, 0, None, None)


def test_add_request_bounds_items_per_request():
    AddRequest(vectors=[[0.0]] * MAX_VECTORS_PER_REQUEST)
    with pytest.raises(ValidationError, match=f"at most {MAX_VECTORS_PER_REQUEST} items"):
        AddRequest(vectors=[[0.0]] * (MAX_VECTORS_PER_REQUEST + 1))
    with pytest.raises(ValidationError, match=f"at most {MAX_IMAGES_PER_REQUEST} items"):
        AddRequest(images=["x"] * (MAX_IMAGES_PER_REQUEST + 1))
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        AddRequest.model_validate({"vectors": [[0.0]], "ids": [3]})


def test_the_description_is_a_valid_openapi_document(openapi):
    """What client generators check first (issue 24: the description had dangling $ref)."""
    validator = pytest.importorskip(
        "openapi_spec_validator", reason="needs openapi-spec-validator (the dev extra)"
    )
    validator.validate(openapi)
    paths = openapi["paths"]
    assert {"/search", "/search/batch", "/items", "/items/{item_id}/image/full"} <= set(paths)
    components = openapi["components"]["schemas"]
    for name in ("SearchResponse", "BatchSearchResponse", "TieGroup", "Filter", "ItemList"):
        assert name in components, name
    assert components["SearchResult"]["properties"]["rank"]["type"] == "integer"
    item_id = paths["/items/{item_id}"]["get"]["parameters"][0]["schema"]
    assert (item_id["minimum"], item_id["maximum"]) == (0, 2**63 - 1)


def test_docs_page_uses_the_packaged_assets(tmp_path):
    import httpx

    from dpq.serve import running

    rng = np.random.default_rng(0)
    index = DPQIndex(rng.normal(size=(2, 4, 3)).astype(np.float32))
    index.add_features(rng.normal(size=(10, 3)).astype(np.float32))
    path = index.save(tmp_path / "tiny.index.npz")
    app = create_app(ServeSettings(path, fsync=False), log=lambda _message: None)
    with running(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        html = client.get("/docs").text
        assert "cdn" not in html.lower() and "/static-docs/swagger-ui-bundle.js" in html
        script = client.get("/static-docs/swagger-ui-bundle.js")
        assert script.status_code == 200 and len(script.content) > 100_000


@pytest.mark.parametrize(
    ("fields", "phrase"),
    [
        ({"id": True}, "valid integer"),  # was read as id 1
        ({"id": 1, "k": "5"}, "valid integer"),  # was read as 5
        ({"id": 1, "k": 5.0}, "valid integer"),
        ({"id": 2**64}, "less than or equal to 9223372036854775807"),  # was an OverflowError
        ({"id": -1}, "greater than or equal to 0"),
        ({"vector": [[1.0, 2.0], [3.0, 4.0]]}, "a flat list of numbers (D floats); got a list of lists"),
        ({"vector": ["x"] * 300}, "got a list holding something that is not a number"),
        ({"vector": "1, 2, 3"}, "got a str"),
        ({"vector": [1.0, True]}, "not a number"),
        ({"id": 1, "exclude": [2**63]}, "less than or equal to"),
        ({"id": 1, "filter": {"labels": []}}, "at least 1 item"),
        ({"id": 1, "filter": {"labels": ["a"], "match": "most"}}, "'any' or 'all'"),
        ({"id": 1, "with_codes": "yes"}, "valid boolean"),
    ],
)  # fmt: skip
def test_search_request_is_strict_and_says_one_thing(fields, phrase):
    with pytest.raises(ValidationError, match=re.escape(phrase)) as refused:
        SearchRequest.model_validate(fields)
    assert len(refused.value.errors()) == 1  # one sentence, not one per element


def test_vectors_of_numpy_floats_are_numbers_too():
    # parsed JSON holds exactly int and float; a Python caller may hold numpy's float64
    vector = list(np.arange(4, dtype=np.float64))
    assert SearchRequest.model_validate({"vector": vector}).vector == [0.0, 1.0, 2.0, 3.0]
    assert AddRequest.model_validate({"vectors": [vector, [1, 2.5, 3, 4]]}).vectors[1][1] == 2.5
    with pytest.raises(ValidationError, match="not a number"):
        SearchRequest.model_validate({"vector": [np.float64(1.0), np.bool_(True)]})


def test_batch_and_add_requests_are_strict_too():
    BatchSearchRequest.model_validate({"queries": [{"id": 1}, {"vector": [0.5, 1]}], "k": 3})
    with pytest.raises(ValidationError, match="at least 1 item"):
        BatchSearchRequest.model_validate({"queries": []})
    with pytest.raises(ValidationError, match=f"at most {MAX_QUERIES_PER_REQUEST} items"):
        BatchSearchRequest.model_validate({"queries": [{"id": 1}] * (MAX_QUERIES_PER_REQUEST + 1)})
    with pytest.raises(ValidationError, match="valid integer"):
        BatchSearchRequest.model_validate({"queries": [{"id": "1"}]})
    with pytest.raises(ValidationError) as refused:
        AddRequest.model_validate({"vectors": [[1.0, "x"]] * 300})
    assert len(refused.value.errors()) == 1 and "n x D floats" in str(refused.value)
