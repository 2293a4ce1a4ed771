"""dpq.serve.schemas: the request bodies' bounds and their OpenAPI description (every
``$ref`` of the app's description resolves, the request models included)."""

from __future__ import annotations

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
    MAX_RERANK_CANDIDATES,
    MAX_RESULTS,
    MAX_VECTORS_PER_REQUEST,
)
from dpq.serve.schemas import (  # noqa: E402
    REQUEST_MODELS,
    AddRequest,
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
