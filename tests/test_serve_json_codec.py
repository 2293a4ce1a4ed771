"""dpq.serve.json_codec: the Rust JSON parser and serializer give what the standard
library gives, and bad bodies a clear ValueError."""

from __future__ import annotations

import json

import numpy as np
import pytest
from starlette.responses import JSONResponse

from dpq.serve.json_codec import JSON_MEDIA_TYPE, FastJSONResponse, media_type, parse_json


def test_parse_json_reads_what_the_standard_library_reads():
    rng = np.random.default_rng(0)
    for scale in (1e-8, 1e-3, 1.0, 1e3, 1e8):
        vector = (rng.standard_normal(300) * scale).tolist()
        raw = json.dumps({"vector": vector, "k": 20, "filter": {"labels": ["cat", "é"]}}).encode()
        parsed = parse_json(raw)
        assert parsed == json.loads(raw)  # every float bit for bit
        assert [type(x) for x in parsed["vector"]] == [float] * 300
    big = 123456789012345678901234567890
    assert parse_json(f'{{"id": {big}}}'.encode())["id"] == big  # refused later by the schema
    assert parse_json(b'{"a": 1, "a": 2}') == {"a": 2}  # the last duplicate wins, as json does


@pytest.mark.parametrize("raw", [b'{"vector": [1, 2', b"[1, 2,]", b"", b"\xff\xfe", b"{'a': 1}"])
def test_parse_json_refuses_with_the_place(raw):
    with pytest.raises(ValueError, match="the request body is not valid JSON: .*column"):
        parse_json(raw)


def test_fast_response_writes_the_same_json():
    body = {
        "results": [{"id": i, "distance": 0.1 * i, "label": "cat"} for i in range(20)],
        "tie_groups": [[0, 2]],
        "query": {"label": "caf\u00e9", "tiny": 1e-5},
    }
    fast = FastJSONResponse(body).body
    assert json.loads(fast) == json.loads(JSONResponse(body).body) == body
    assert fast.decode("utf-8").count("\u00e9") == 1  # UTF-8, not \\u escapes
    assert json.loads(FastJSONResponse({"d": float("inf")}).body) == {"d": None}


def test_media_type_drops_parameters_and_case():
    assert media_type("Application/JSON; charset=utf-8") == JSON_MEDIA_TYPE
    assert media_type("multipart/form-data; boundary=x") == "multipart/form-data"
    assert media_type("") == ""
