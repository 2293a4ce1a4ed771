"""dpq.serve.metrics: the collectors alone, and the per-route middleware in an app served by
uvicorn on 127.0.0.1 (answers given before routing, 413, are named by their route)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from dpq.index import DPQIndex  # noqa: E402
from dpq.serve import ServeSettings, create_app, running  # noqa: E402
from dpq.serve.metrics import ServiceMetrics  # noqa: E402


def test_collectors_items_stages_and_pending():
    items = [3]
    metrics = ServiceMetrics(items=lambda: items[0])
    with metrics.stage("decode"):
        pass
    with pytest.raises(RuntimeError), metrics.stage("search"):  # an error still counts
        raise RuntimeError("boom")
    metrics.pending.set(2)
    items[0] = 7
    body, media_type = metrics.exposition()
    text = body.decode()
    assert media_type.startswith("text/plain")
    assert "dpq_items 7.0" in text and "dpq_pending 2.0" in text
    assert 'dpq_stage_seconds_count{stage="decode"} 1.0' in text
    assert 'dpq_stage_seconds_count{stage="search"} 1.0' in text
    other = ServiceMetrics(items=lambda: 0)  # its own registry: no clash with the first
    assert "dpq_items 0.0" in other.exposition()[0].decode()


def test_requests_are_counted_per_route_template(tmp_path):
    rng = np.random.default_rng(0)
    index = DPQIndex(rng.normal(size=(2, 4, 3)).astype(np.float32))
    index.add_features(rng.normal(size=(10, 3)).astype(np.float32))
    path = index.save(tmp_path / "tiny.index.npz")
    app = create_app(
        ServeSettings(path, fsync=False, max_upload_bytes=1000), log=lambda _message: None
    )
    with running(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/items/4").status_code == 200
        assert client.get("/items/99").status_code == 404
        too_big = client.post("/search", content=b"{" + b" " * 2000 + b"}")
        assert too_big.status_code == 413
        assert client.get("/no/such/page").status_code == 404
        text = client.get("/metrics").text
    counted = 'dpq_responses_total{{endpoint="{}",method="{}",status="{}"}} 1.0'
    assert counted.format("/items/{item_id}", "GET", 200) in text
    assert counted.format("/items/{item_id}", "GET", 404) in text
    assert counted.format("/search", "POST", 413) in text  # refused before routing
    assert counted.format("unmatched", "GET", 404) in text
    assert 'dpq_request_seconds_count{endpoint="/items/{item_id}",method="GET"} 2.0' in text
