"""dpq.serve: the HTTP service on a real uvicorn (127.0.0.1, ephemeral port), queried with
httpx; the write journal; the limits; a server killed with SIGKILL mid-stream of adds."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
pytest.importorskip("multipart")

from conftest import join_threads, wait_until  # noqa: E402
from dpq.index import DPQIndex  # noqa: E402
from dpq.serve import ServeSettings, create_app, running  # noqa: E402
from dpq.serve.limits import TokenBuckets  # noqa: E402
from dpq.serve.ranking import tie_keys, tie_seed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LEVELS, K, DIM = 4, 256, 16


def _residual_kmeans(features: np.ndarray, levels: int, k: int) -> np.ndarray:
    """float32 (levels, k, D) codebooks fitted level by level on the residuals (faiss)."""
    import faiss

    residual = features.astype(np.float32).copy()
    books = []
    for level in range(levels):
        kmeans = faiss.Kmeans(residual.shape[1], k, niter=8, seed=level, verbose=False)
        kmeans.cp.min_points_per_centroid = 1
        kmeans.train(residual)
        assign = kmeans.index.search(residual, 1)[1][:, 0]
        residual -= kmeans.centroids[assign]
        books.append(kmeans.centroids.copy())
    return np.stack(books)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A small_cnn model (random weights, codebooks fitted to its features) saved as a
    checkpoint, and the index of sklearn's 1,797 digits encoded with it (ids = rows)."""
    import torch

    from dpq.config import DPQConfig, ModelConfig, QuantizerConfig
    from dpq.data import load_digits
    from dpq.model.network import DPQModel

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    config = DPQConfig(
        model=ModelConfig(backbone="small_cnn", backbone_kwargs={"width": 0.25}, num_classes=10),
        quantizer=QuantizerConfig(num_levels=LEVELS, codebook_size=K, dim=DIM),
    )
    model = DPQModel(config)
    digits = load_digits()
    features = model.extract_features(digits.images)
    codebooks = _residual_kmeans(features, LEVELS, K)
    with torch.no_grad():
        model.quantizer.codebooks.copy_(torch.from_numpy(codebooks))
    model.save_checkpoint(root / "model")
    index = DPQIndex(codebooks, metadata={"classes": digits.classes, "source": "digits"})
    index.add_features(features, labels=digits.labels)
    index.save(root / "db.index.npz")
    vector_index = DPQIndex(codebooks)  # no labels, no images: the vectors-only service
    vector_index.add_features(np.random.default_rng(1).normal(size=(500, DIM)).astype(np.float32))
    vector_index.save(root / "vectors.index.npz")
    return {"root": root, "model": root / "model", "index": root / "db.index.npz",
            "vectors": root / "vectors.index.npz"}  # fmt: skip


def _tie_ordered(index: DPQIndex, vector: np.ndarray, k: int, deep: int | None = None, **search):
    """(ids, distances) of the top k of ``index.search`` with ties ordered as the service
    orders them (dpq.serve.ranking.tie_keys of the query), from the top ``deep`` (default:
    every item, so that a tie group at rank k is whole)."""
    distances, ids = index.search(vector[None], deep or index.ntotal, **search)
    order = np.lexsort((tie_keys(ids[0], tie_seed(vector)), distances[0]))
    return ids[0][order][:k], distances[0][order][:k]


def _copy_index(source: Path, folder: Path) -> Path:
    target = folder / source.name
    shutil.copy(source, target)
    return target


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb)."""
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR checksum
    return bytes(data)


def _png(size=(12, 10), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def service(built, tmp_path_factory):
    """The digits collection with its model and images, served read-mostly for many tests."""
    folder = tmp_path_factory.mktemp("shared-service")
    index = _copy_index(built["index"], folder)
    app = create_app(
        ServeSettings(index, built["model"], "digits", api_key="s3cret", max_upload_bytes=200_000)
    )
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, app


# ---------------------------------------------------------------- read endpoints


def test_health_stats_and_page(service, built):
    client, _ = service
    assert client.get("/health").json() == {"status": "ok", "items": 1797}
    stats = client.get("/stats").json()
    assert stats["items"] == 1797 and stats["code_lengths"] == [8, 16, 24, 32]
    assert stats["bytes_per_item"] == {"8": 4, "16": 8, "24": 8, "32": 8}
    index = DPQIndex.load(built["index"])
    assert stats["codebook_sha256"] == index.codebook_sha256
    config = json.loads((built["model"] / "config.json").read_text())
    assert stats["model"]["weights_sha256"] == config["checkpoint"]["weights_sha256"]
    assert stats["accepts"] == ["vector", "id", "image"] and stats["classes"][3] == "3"
    assert stats["writes_need_api_key"] is True and stats["image_size"] == [8, 8]
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/app.js">' in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/items", "/items/{item_id}", "/items/{item_id}/image", "/stats"} <= set(
        paths
    )


def test_search_by_id_equals_index_search(service, built):
    client, _ = service
    index = DPQIndex.load(built["index"])
    for item_id, bits in [(7, 32), (7, 8), (1000, 16), (1796, 24)]:
        request = {"id": item_id, "k": 15, "bits": bits, "exclude_query": False}
        body = client.post("/search", json=request).json()
        vector = index.decode(index.codes[item_id : item_id + 1])[0]
        ids, distances = _tie_ordered(index, vector, 15, num_levels=bits // 8)
        assert [r["id"] for r in body["results"]] == ids.tolist()
        np.testing.assert_allclose(
            [r["distance"] for r in body["results"]], distances, rtol=1e-5, atol=1e-6
        )
        assert body["bits"] == bits and body["total"] == 1797
        assert [r["label"] for r in body["results"]] == [str(index.labels[i]) for i in ids]
        assert body["query"] == {"id": item_id, "label": str(index.labels[item_id])}
        assert body["results"][0]["image_url"] == f"/items/{ids[0]}/image"
        assert [r["rank"] for r in body["results"]] == list(range(15))


def test_search_by_vector_offset_and_rerank(service, built):
    client, _ = service
    index = DPQIndex.load(built["index"])
    vector = np.random.default_rng(3).normal(size=DIM).astype(np.float32)
    ids, _ = _tie_ordered(index, vector, 30)
    first = client.post("/search", json={"vector": vector.tolist(), "k": 10}).json()
    page2 = client.post("/search", json={"vector": vector.tolist(), "k": 10, "offset": 10}).json()
    assert [r["id"] for r in first["results"] + page2["results"]] == ids[:20].tolist()
    reranked, _ = _tie_ordered(
        index, vector, 10, deep=50, num_levels=4, rerank_from=1, rerank_candidates=50
    )
    body = client.post(
        "/search", json={"vector": vector.tolist(), "k": 10, "rerank": 8, "rerank_candidates": 50}
    ).json()
    assert [r["id"] for r in body["results"]] == reranked.tolist()


def test_search_by_image_upload_and_base64(service, built):
    from dpq.model.network import DPQModel
    from dpq.serve.images import decode_upload, model_input

    client, _ = service
    data = _png((20, 14), seed=5)
    model = DPQModel.from_checkpoint(built["model"])
    pixels = model_input(decode_upload(data, "q.png"), (8, 8))
    index = DPQIndex.load(built["index"])
    ids, _ = _tie_ordered(index, model.extract_features(pixels[None])[0], 12, num_levels=2)
    uploaded = client.post(
        "/search", files={"file": ("q.png", data, "image/png")}, data={"k": "12", "bits": "16"}
    )
    assert uploaded.status_code == 200, uploaded.text
    assert [r["id"] for r in uploaded.json()["results"]] == ids.tolist()
    encoded = client.post(
        "/search", json={"image": base64.b64encode(data).decode(), "k": 12, "bits": 16}
    ).json()
    assert [r["id"] for r in encoded["results"]] == ids.tolist()


def test_items_and_thumbnails(service, built):
    client, _ = service
    item = client.get("/items/42").json()
    assert item["id"] == 42 and item["label"] == str(DPQIndex.load(built["index"]).labels[42])
    assert item["metadata"] == {"source": "digits", "row": 42}
    assert item["image_url"] == "/items/42/image"
    image = client.get("/items/42/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(image.content)) as picture:
        assert picture.size == (128, 128)  # 8x8 digits enlarged to the thumbnail size
    assert client.get("/items/random").json()["id"] in range(1797)


def test_metrics_histograms_per_endpoint_and_stage(service):
    client, _ = service
    client.post("/search", json={"id": 3})
    client.post("/search", files={"file": ("q.png", _png(), "image/png")})
    text = client.get("/metrics").text
    assert 'dpq_request_seconds_count{endpoint="/search",method="POST"}' in text
    for stage in ("decode", "encode", "search"):
        assert f'dpq_stage_seconds_count{{stage="{stage}"}}' in text
    assert 'dpq_responses_total{endpoint="/search",method="POST",status="200"}' in text
    assert "dpq_items 1797.0" in text


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("body", "status", "phrase"),
    [
        ({"id": 999_999}, 404, "no item with id 999999"),
        ({"vector": [0.0] * 3}, 422, "expects 16"),
        ({"id": 1, "k": 0}, 422, "greater than or equal to 1"),
        ({"id": 1, "k": 1001}, 422, "less than or equal to 1000"),
        ({"id": 1, "bits": 12}, 422, "bits must be one of [8, 16, 24, 32]"),
        ({"id": 1, "bits": 40}, 422, "bits must be one of"),
        ({"id": 1, "rerank": 32}, 422, "rerank must be shorter"),
        ({"id": 1, "vector": [0.0] * 16}, 422, "exactly one query"),
        ({}, 422, "exactly one query"),
        ({"id": 1, "nprobe": 4}, 422, "nprobe needs a partitioned index"),
        ({"image": "not base64!"}, 422, "not valid base64"),
        ({"image": base64.b64encode(b"just text").decode()}, 415, "not an image"),
        ({"id": 1, "colour": "red"}, 422, "Extra inputs are not permitted"),
        # issue 24: ids beyond int64, loose types, overflowing distances, badly shaped vectors
        ({"id": 2**64}, 422, "less than or equal to 9223372036854775807"),
        ({"id": True}, 422, "valid integer"),
        ({"id": 1, "k": "5"}, 422, "valid integer"),
        ({"vector": [1e38] * DIM}, 422, "overflow 32-bit floats"),
        ({"vector": [[0.5] * DIM]}, 422, "a flat list of numbers"),
        ({"vector": ["x"] * 300}, 422, "a flat list of numbers"),
        ({"id": 1, "filter": {"labels": ["3", "4"], "match": "all"}}, 422, "one label per item"),
        ({"id": 1, "filter": {"labels": ["cat"]}}, 422, "unknown label 'cat'"),
        ({"id": 1, "exclude": [2**63]}, 422, "less than or equal to"),
    ],
)
def test_search_errors(service, body, status, phrase):
    client, _ = service
    answer = client.post("/search", json=body)
    assert answer.status_code == status, answer.text
    assert phrase in json.dumps(answer.json()["detail"])
    detail = answer.json()["detail"]
    assert isinstance(detail, str) or len(detail) == 1  # one sentence, never one per element


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/items/{}"), ("GET", "/items/{}/image"), ("GET", "/items/{}/image/full"),
     ("DELETE", "/items/{}")],
)  # fmt: skip
def test_ids_beyond_int64_are_422_on_every_route(service, method, path):
    client, _ = service
    for item_id in (2**63, 2**64, 10**30, -1):
        answer = client.request(method, path.format(item_id), headers={"X-API-Key": "s3cret"})
        assert answer.status_code == 422, (item_id, answer.text)
    assert client.get("/items/5").status_code == 200  # nothing was removed


def test_upload_errors(service):
    client, _ = service
    not_image = client.post("/search", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert not_image.status_code == 415 and "not an image" in not_image.json()["detail"]
    truncated = client.post(
        "/search", files={"file": ("cut.png", _png((60, 60))[:300], "image/png")}
    )
    assert truncated.status_code == 422 and "truncated" in truncated.json()["detail"]
    bomb_bytes = _png_declaring(20_000, 20_000)  # 400 megapixels declared in 70 bytes
    bomb = client.post("/search", files={"file": ("bomb.png", bomb_bytes, "image/png")})
    assert bomb.status_code == 422 and "decompression bomb" in bomb.json()["detail"]
    big = client.post("/search", files={"file": ("big.png", b"\0" * 300_000, "image/png")})
    assert big.status_code == 413 and "upload limit of 200,000 bytes" in big.json()["detail"]
    chunked = client.post(
        "/search", content=iter([b"{" + b" " * 150_000, b" " * 150_000 + b"}"]),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert chunked.status_code == 413
    assert (
        client.post(
            "/search", content=b"{nope", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    assert client.get("/items/99999").status_code == 404
    assert client.get("/items/99999/image").status_code == 404
    assert client.get("/items/abc").status_code == 422


def test_writes_need_the_api_key(service):
    client, _ = service
    vector = {"vectors": [[0.0] * DIM]}
    assert client.post("/items", json=vector).status_code == 401
    assert client.post("/items", json=vector, headers={"X-API-Key": "wrong"}).status_code == 401
    denied = client.delete("/items/5")
    assert denied.status_code == 401 and "API key" in denied.json()["detail"]
    assert client.get("/items/5").status_code == 200  # nothing was removed


# ---------------------------------------------------------------- writes and durability


def test_add_find_delete_and_restart(built, tmp_path):
    index_path = _copy_index(built["index"], tmp_path)
    key = {"Authorization": "Bearer k"}
    app = create_app(ServeSettings(index_path, built["model"], "digits", api_key="k"))
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        data = _png((16, 16), seed=9)
        added = client.post(
            "/items",
            files=[("files", ("mine.png", data, "image/png")), ("files", ("two.png", _png(seed=2), "image/png"))],
            data={"labels": ["7", ""]},
            headers=key,
        )  # fmt: skip
        assert added.status_code == 201, added.text
        ids = added.json()["ids"]
        assert ids == [1797, 1798] and added.json()["items"] == 1799
        item = client.get(f"/items/{ids[0]}").json()
        assert item["label"] == "7" and item["metadata"]["name"] == "mine.png"
        assert client.get(f"/items/{ids[1]}").json()["label"] is None
        assert client.get(f"/items/{ids[0]}/image").status_code == 200
        found = client.post(
            "/search", files={"file": ("q.png", data, "image/png")}, data={"k": "5"}
        )
        assert found.json()["results"][0]["id"] == ids[0]
        vectors = client.post(
            "/items", json={"vectors": [[0.5] * DIM], "labels": [3], "names": ["v"]}, headers=key
        )
        assert vectors.status_code == 201 and vectors.json()["ids"] == [1799]
        assert client.get("/items/1799/image").status_code == 404  # a vector has no image
        bad_label = client.post(
            "/items", json={"vectors": [[0.0] * DIM], "labels": ["cat"]}, headers=key
        )
        assert bad_label.status_code == 422 and "unknown label 'cat'" in bad_label.json()["detail"]
        wrong_size = client.post("/items", json={"vectors": [[0.0] * 3]}, headers=key)
        assert wrong_size.status_code == 422
        assert client.delete(f"/items/{ids[1]}", headers=key).json()["items"] == 1799
        assert client.get(f"/items/{ids[1]}").status_code == 404
        assert client.delete(f"/items/{ids[1]}", headers=key).status_code == 404
        gone = client.post("/search", json={"vector": [0.0] * DIM, "k": 1000}).json()
        assert ids[1] not in [r["id"] for r in gone["results"]]
        # the journal holds the writes; the index file is not rewritten for each one
        assert DPQIndex.load(index_path).ntotal == 1797
    # clean shutdown compacted: the index file has them, the journal is empty again
    assert DPQIndex.load(index_path).ntotal == 1799
    again = create_app(ServeSettings(index_path, built["model"], "digits", allow_open_writes=True))
    with running(again) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get(f"/items/{ids[0]}").json()["metadata"]["name"] == "mine.png"
        assert client.get(f"/items/{ids[1]}").status_code == 404
        assert client.get(f"/items/{ids[0]}/image").status_code == 200
        # ids are never reused, even the removed one
        assert client.post("/items", json={"vectors": [[0.0] * DIM]}).json()["ids"] == [1800]


def test_journal_replay_without_clean_shutdown(built, tmp_path):
    """Writes acknowledged but never compacted (no shutdown) come back from the journal."""
    from dpq.serve import open_collection

    index_path = _copy_index(built["vectors"], tmp_path)
    collection = open_collection(ServeSettings(index_path))
    rng = np.random.default_rng(0)
    new = [int(collection.add(rng.normal(size=(2, DIM)))[0]) for _ in range(3)]
    assert collection.remove(new[1]) and not collection.remove(123_456)
    collection.journal.close()  # as a crash would leave it: no compaction
    assert DPQIndex.load(index_path).ntotal == 500
    reopened = open_collection(ServeSettings(index_path))
    ids = set(reopened.index.ids.tolist())
    assert {new[0], new[0] + 1, new[2], new[2] + 1} <= ids and new[1] not in ids
    assert reopened.index.ntotal == 505
    assert DPQIndex.load(index_path).ntotal == 505  # replay compacted into the index file
    reopened.close()


def _start_server(index: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`dpq serve --port 0` in a subprocess; returns it and its URL once it listens."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    handle = log.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "dpq.cli", "serve", "--index", str(index), "--port", "0", *extra],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=env,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if " items at http://" in line:
                url = line.split(" items at ")[1].split("/ ")[0]
                return process, url
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"the server did not start:\n{log.read_text()}")


def test_sigkill_mid_stream_keeps_every_acknowledged_add(built, tmp_path):
    index_path = _copy_index(built["vectors"], tmp_path)
    process, url = _start_server(index_path, tmp_path / "first.log", "--allow-open-writes")
    acknowledged: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def stream_adds() -> None:
        rng = np.random.default_rng(0)
        with httpx.Client(base_url=url, timeout=5) as client:
            for _ in range(5000):  # bounded; the kill ends it long before
                if stop.is_set():
                    return
                try:
                    answer = client.post(
                        "/items", json={"vectors": rng.normal(size=(2, DIM)).tolist()}
                    )
                except httpx.HTTPError as exc:
                    failures.append(type(exc).__name__)
                    return
                if answer.status_code == 201:
                    acknowledged.extend(answer.json()["ids"])

    writers = [threading.Thread(target=stream_adds) for _ in range(3)]
    try:
        for thread in writers:
            thread.start()
        wait_until(
            lambda: len(acknowledged) >= 60 or not any(t.is_alive() for t in writers),
            30,
            lambda: f"60 acknowledged adds (have {len(acknowledged)}, failures {failures})",
        )
        process.send_signal(signal.SIGKILL)  # mid-stream: requests are in flight
        process.wait(10)
    finally:
        stop.set()
        if process.poll() is None:
            process.kill()
            process.wait(10)
    join_threads(writers, 10, "the three writers to stop after the kill")
    assert len(acknowledged) >= 60 and failures, "the kill did not interrupt the stream"
    assert DPQIndex.load(index_path).ntotal == 500  # the index file itself is whole
    assert "writes are OPEN to anyone" in (tmp_path / "first.log").read_text()
    process, url = _start_server(index_path, tmp_path / "second.log")
    assert "read-only: writes need --api-key" in (tmp_path / "second.log").read_text()
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            assert client.get("/health").json()["items"] >= 500 + len(acknowledged)
            for item_id in acknowledged:
                assert client.get(f"/items/{item_id}").status_code == 200, item_id
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    saved = DPQIndex.load(index_path)  # replayed, compacted, and saved again on shutdown
    assert set(acknowledged) <= set(saved.ids.tolist())


def test_search_never_sees_half_a_batch(built, tmp_path):
    """Batches of 50 identical vectors are added while searches for that vector run: every
    search finds a multiple of 50 copies."""
    index_path = _copy_index(built["vectors"], tmp_path)
    index = DPQIndex.load(index_path)
    target = np.full(DIM, 9.0, np.float32)  # far from every existing item
    code = index.encode(target[None])
    assert not (index.codes == code).all(axis=1).any()  # no item shares its code
    single = DPQIndex(index.codebooks)
    single.add(code)
    copy_distance = float(f"{single.search(target[None], 1)[0][0, 0]:.6g}")
    app = create_app(ServeSettings(index_path, fsync=False, allow_open_writes=True))
    seen: list[int] = []
    adds_done = threading.Event()
    with running(app) as url:

        def search_loop() -> None:
            with httpx.Client(base_url=url, timeout=10) as client:
                for _ in range(2000):  # bounded; ends a few searches after the adds
                    body = client.post("/search", json={"vector": target.tolist(), "k": 500}).json()
                    seen.append(sum(r["distance"] == copy_distance for r in body["results"]))
                    if adds_done.is_set() and seen[-1] == 300:
                        return

        searchers = [threading.Thread(target=search_loop) for _ in range(2)]
        for thread in searchers:
            thread.start()
        with httpx.Client(base_url=url, timeout=10) as client:
            wait_until(lambda: seen, 60, "the first search's answer")
            for _ in range(6):
                answer = client.post("/items", json={"vectors": [target.tolist()] * 50})
                assert answer.status_code == 201
        adds_done.set()
        join_threads(searchers, 60, "the searchers to see all 300 copies")
    assert seen[0] == 0 and seen[-1] == 300, seen
    assert all(count % 50 == 0 for count in seen), seen


# ---------------------------------------------------------------- limits


def test_token_buckets_with_an_injected_clock():
    now = [100.0]
    buckets = TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0], max_keys=2)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)  # empty: the next token in 1/rate s
    now[0] += 0.5
    assert buckets.take("a") == 0.0 and buckets.take("a") > 0
    assert buckets.take("b") == 0.0  # clients have their own buckets
    now[0] += 10
    assert [buckets.take("a") for _ in range(4)][:3] == [0.0] * 3  # refilled up to the burst
    buckets.take("c")  # a third key evicts the least recently used
    assert len(buckets._buckets) == 2
    with pytest.raises(ValueError, match="rate must be a positive"):
        TokenBuckets(rate=0, burst=1)


def test_rate_limit_answers_429(built, tmp_path):
    now = [0.0]
    app = create_app(
        ServeSettings(_copy_index(built["vectors"], tmp_path), rate_limit=1.0, rate_burst=2),
        clock=lambda: now[0],
    )
    with running(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        codes = [client.post("/search", json={"id": 1}).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        limited = client.post("/search", json={"id": 1})
        assert limited.headers["retry-after"] == "1" and "1 per second" in limited.json()["detail"]
        assert client.get("/health").status_code == 200  # health checks are never limited
        now[0] += 1.0
        assert client.post("/search", json={"id": 1}).status_code == 200


def test_busy_service_answers_503(built, tmp_path):
    """With max_pending=1, a search waiting for a worker makes the next request a 503."""
    app = create_app(ServeSettings(_copy_index(built["vectors"], tmp_path), max_pending=1))
    collection = app.state.service.collection
    with running(app) as url, httpx.Client(base_url=url, timeout=20) as client:
        answers: list[int] = []
        with collection._lock.writing():  # hold off searches, as a long write would
            first = threading.Thread(
                target=lambda: answers.append(client.post("/search", json={"id": 1}).status_code)
            )
            first.start()
            wait_until(
                lambda: "dpq_pending 1.0" in client.get("/metrics").text,
                10,
                "the first search to wait for a worker (dpq_pending 1)",
            )
            busy = client.post("/search", json={"id": 2})
        join_threads([first], 10, "the first search's answer")
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert "busy" in busy.json()["detail"] and answers == [200]


def test_vectors_only_service_refuses_images(built, tmp_path):
    app = create_app(ServeSettings(_copy_index(built["vectors"], tmp_path)))
    with running(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        stats = client.get("/stats").json()
        assert stats["accepts"] == ["vector", "id"] and stats["labels"] is False
        answer = client.post("/search", files={"file": ("q.png", _png(), "image/png")})
        assert answer.status_code == 422 and "no model" in answer.json()["detail"]
        result = client.post("/search", json={"id": 3, "k": 3}).json()["results"]
        assert result[0]["label"] is None and result[0]["image_url"] is None
        assert client.get("/items/3/image").status_code == 404
        assert (
            client.get("/items/3/image").json()["detail"].startswith("item 3 has no stored image")
        )


def test_cli_serve_options_and_warnings(built, tmp_path, capsys):
    from dpq.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--index", "x.npz"])
    assert (args.host, args.port, args.max_upload_mb, args.rate_limit) == (
        "127.0.0.1",
        8000,
        10.0,
        0.0,
    )
    assert main(["serve", "--index", str(tmp_path / "missing.npz"), "--port", "0"]) == 2
    assert "index file not found" in capsys.readouterr().err
    batching = ["--batch-max", "1", "--batch-wait-ms", "0.5"]
    args = build_parser().parse_args(["serve", "--index", "x.npz", *batching])
    assert (args.batch_max, args.batch_wait_ms) == (1, 0.5)
    assert main(["serve", "--index", "x.npz", "--port", "0", "--batch-max", "0"]) == 2
    assert "batch_max must be in 1..4096; got 0" in capsys.readouterr().err
    assert (
        main(
            ["serve", "--index", str(built["index"]), "--model", str(built["model"]), "--port", "0"]
        )
        == 2
    )
    assert "--image-size" in capsys.readouterr().err  # a model needs to know its input size
    from dpq.serve.server import exposure_warning

    assert exposure_warning("127.0.0.1", None) is None
    assert "--api-key" in exposure_warning("0.0.0.0", None)
    assert "reachable from every network" in exposure_warning("::", "key")
    assert "--api-key" not in exposure_warning("::", "key")


FREEZE_SCRIPT = """
import gc, weakref
import dpq.serve.app  # the libraries a served process holds
from dpq.serve.server import freeze_startup_heap

frozen = freeze_startup_heap()
class Node: pass
node = Node(); node.self = node; alive = weakref.ref(node); del node  # a cycle made later
gc.collect()
print(frozen, gc.get_freeze_count() == frozen, alive() is None, len(gc.get_objects(2)))
"""


def test_the_startup_heap_is_frozen_and_later_garbage_still_collected():
    """`dpq serve` moves the startup objects out of the collector's reach (a full collection
    walked them all: a 175 ms stop every ~1.3 s under load); cycles made later still go.
    In a subprocess: freezing is for the whole process."""
    out = subprocess.run(
        [sys.executable, "-c", FREEZE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert out.returncode == 0, out.stderr
    frozen, counted, collected, oldest = out.stdout.split()
    assert int(frozen) > 50_000  # FastAPI, numpy, numba, ...
    assert (counted, collected) == ("True", "True")
    assert int(oldest) < int(frozen) // 10  # what a full collection walks now


def test_a_partitioned_index_serves_adds_searches_by_id_and_deletes(built, tmp_path):
    """Grouped by the first two codes: new items wait in the index's tail, yet a search
    with nprobe finds them at once, and lookups by id (item, label, search by id) agree."""
    index = DPQIndex.load(built["index"])
    index.repartition(2)
    index_path = index.save(tmp_path / "partitioned.index.npz")
    app = create_app(ServeSettings(index_path, built["model"], "digits", allow_open_writes=True))
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        vector = np.asarray(index.decode(index.codes[5:6])[0]) + 0.25
        added = client.post("/items", json={"vectors": [vector.tolist()], "labels": ["3"]})
        assert added.status_code == 201, added.text
        new_id = added.json()["ids"][0]
        found = client.post("/search", json={"vector": vector.tolist(), "k": 3, "nprobe": 4})
        assert found.status_code == 200, found.text
        assert found.json()["results"][0]["id"] == new_id
        assert found.json()["results"][0]["label"] == "3"
        assert client.get(f"/items/{new_id}").json()["label"] == "3"
        by_id = client.post(
            "/search", json={"id": new_id, "k": 1, "nprobe": 4, "exclude_query": False}
        ).json()
        assert by_id["results"][0]["id"] == new_id
        old = int(index.ids[7])
        assert (
            client.get(f"/items/{old}").json()["label"]
            == index.metadata["classes"][int(index.labels_of([old])[0])]
        )
        assert client.delete(f"/items/{new_id}").status_code == 200
        assert client.get(f"/items/{new_id}").status_code == 404
    reloaded = DPQIndex.load(index_path)
    assert reloaded.partition_levels == 2 and reloaded.ntotal == index.ntotal


# ---------------------------------------------------------------- who may write (issue 24)


def test_writes_refused_by_content_type_origin_and_fetch_site(built, tmp_path):
    """Open writes, the worst case: still no write from another site's page or in a body
    a page can send without a preflight (text/plain, form-encoded); the service's own page
    and programs write."""
    app = create_app(ServeSettings(_copy_index(built["vectors"], tmp_path), allow_open_writes=True))
    vector = json.dumps({"vectors": [[0.1] * DIM]})
    evil = {"Origin": "http://evil.example"}
    with running(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        own = {"Origin": url}
        cases = [
            ({"content": vector, "headers": {"content-type": "text/plain"}}, 415),
            ({"content": "vectors=1", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415),
            ({"content": vector, "headers": {"content-type": "application/json", **evil}}, 403),
            ({"files": {"files": ("a.png", _png(), "image/png")}, "headers": evil}, 403),
            ({"content": vector, "headers": {"content-type": "application/json",
                                             "Sec-Fetch-Site": "cross-site"}}, 403),
            ({"content": vector, "headers": {"content-type": "application/json",
                                             "Origin": "http://127.0.0.1:1"}}, 403),
        ]  # fmt: skip
        for request, status in cases:
            answer = client.post("/items", **request)
            assert answer.status_code == status, (request, answer.text)
            assert isinstance(answer.json()["detail"], str)
        assert client.delete("/items/3", headers=evil).status_code == 403
        assert client.get("/health").json()["items"] == 500  # nothing was written
        made = client.post(
            "/items", content=vector, headers={"content-type": "application/json", **own}
        )
        assert made.status_code == 201, made.text
        assert client.post("/items", content=vector,
                           headers={"content-type": "application/json; charset=utf-8"}).status_code == 201  # fmt: skip
        assert client.delete("/items/3", headers=own).status_code == 200
        assert client.get("/stats").json()["writes"] == "open"


def test_writes_are_closed_without_a_key_or_open_writes(built, tmp_path):
    app = create_app(ServeSettings(_copy_index(built["vectors"], tmp_path)))
    with running(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        refused = client.post("/items", json={"vectors": [[0.0] * DIM]})
        assert refused.status_code == 403 and "--allow-open-writes" in refused.json()["detail"]
        assert client.delete("/items/1").status_code == 403
        assert client.get("/items/1").status_code == 200
        stats = client.get("/stats").json()
        assert stats["writes"] == "closed" and stats["writes_need_api_key"] is False
        assert client.post("/search", json={"id": 1}).status_code == 200  # reads stay open


def test_cors_only_for_the_origins_named(built, tmp_path):
    trusted = "http://app.example"
    settings = ServeSettings(
        _copy_index(built["vectors"], tmp_path), api_key="k", cors_origins=(trusted,)
    )
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type,x-api-key"}  # fmt: skip
    with running(create_app(settings)) as url, httpx.Client(base_url=url, timeout=10) as client:
        allowed = client.options("/items", headers={"Origin": trusted, **preflight})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == trusted
        other = client.options("/items", headers={"Origin": "http://evil.example", **preflight})
        assert "access-control-allow-origin" not in other.headers
        added = client.post(
            "/items",
            json={"vectors": [[0.0] * DIM]},
            headers={"Origin": trusted, "Sec-Fetch-Site": "cross-site", "X-API-Key": "k"},
        )
        assert added.status_code == 201 and added.headers["access-control-allow-origin"] == trusted
    (tmp_path / "b").mkdir()
    with running(create_app(ServeSettings(_copy_index(built["vectors"], tmp_path / "b")))) as url:
        plain = httpx.options(f"{url}/search", headers={"Origin": trusted, **preflight})
        assert "access-control-allow-origin" not in plain.headers  # no CORS unless asked


def test_uploads_decode_like_the_collection():
    """The upload path uses dpq.data.decode's decoder: 16-bit scaled, alpha on white."""
    from dpq.serve.images import decode_upload

    ramp = np.array([[0, 257, 32896, 65535]], np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    assert np.asarray(decode_upload(buffer.getvalue(), "depth.png"))[0, :, 0].tolist() == [
        0, 1, 128, 255
    ]  # fmt: skip
    buffer = io.BytesIO()
    Image.new("RGBA", (2, 2), (0, 0, 0, 0)).save(buffer, format="PNG")
    assert np.asarray(decode_upload(buffer.getvalue(), "clear.png")).min() == 255


# ---------------------------------------------------------------- a full disk (issue 24)


def test_a_full_disk_answers_503_keeps_serving_and_resumes(built, tmp_path, capfd):
    """The journal's writer fails as a full disk does: the write is answered 503 with one
    sentence (no 500, no traceback), the index and the journal stay as they were, searches
    go on, and once there is space again writes resume; after a restart the index holds
    exactly the acknowledged writes (kill -9 and replay: the tmpfs test below)."""
    from test_serve_journal import FullDisk

    index_path = _copy_index(built["vectors"], tmp_path)
    app = create_app(ServeSettings(index_path, allow_open_writes=True))
    collection = app.state.service.collection
    disk = FullDisk(None)
    collection.journal.writer = disk
    rows = {"vectors": np.random.default_rng(4).normal(size=(2, DIM)).tolist()}
    with running(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        first = client.post("/items", json=rows)
        assert first.status_code == 201
        journal_before = collection.journal.path.read_bytes()
        disk.allow = 40  # a record torn part-way, then nothing
        for _ in range(3):
            refused = client.post("/items", json=rows)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "10"
            assert "No space left on device" in refused.json()["detail"]
        removed = client.delete(f"/items/{first.json()['ids'][0]}")
        assert removed.status_code == 503
        assert collection.journal.path.read_bytes() == journal_before
        assert client.get("/health").json()["items"] == 502  # nothing of them was applied
        assert client.post("/search", json={"id": 3, "k": 5}).status_code == 200
        disk.allow = None
        again = client.post("/items", json=rows)
        assert again.status_code == 201 and again.json()["items"] == 504
        acknowledged = first.json()["ids"] + again.json()["ids"]
    assert "Traceback" not in capfd.readouterr().err
    reopened = create_app(ServeSettings(index_path))
    kept = set(reopened.state.service.collection.index.ids.tolist())
    assert set(acknowledged) <= kept and len(kept) == 504
    reopened.state.service.close()


def _mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")


def test_a_full_tmpfs_loses_no_acknowledged_write(built, tmp_path):
    """Issue 24's scenario on a real 2 MB tmpfs: adds until the disk is full (201, then
    503, never 500), searches all the while, space freed, adds resume, kill -9, restart:
    every acknowledged add is there, each id once."""
    from dpq.serve.journal import Journal, journal_path

    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "2m")
    try:
        index_path = _copy_index(built["vectors"], disk)
        process, url = _start_server(index_path, tmp_path / "first.log", "--allow-open-writes")
        filler = disk / "filler"
        with filler.open("wb") as handle:  # fill the disk, then leave ~16 kB
            try:
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
            except OSError:
                pass
        with filler.open("r+b") as handle:
            handle.truncate(max(0, filler.stat().st_size - 16384))
        acknowledged: list[int] = []
        statuses: list[int] = []
        rng = np.random.default_rng(0)
        with httpx.Client(base_url=url, timeout=10) as client:
            for _ in range(2000):  # bounded: the disk fills long before
                answer = client.post("/items", json={"vectors": rng.normal(size=(2, DIM)).tolist()})
                statuses.append(answer.status_code)
                if answer.status_code == 201:
                    acknowledged.extend(answer.json()["ids"])
                if statuses[-3:] == [503] * 3:
                    break
            assert set(statuses) == {201, 503} and statuses[-3:] == [503] * 3, statuses
            assert client.post("/search", json={"id": 1}).status_code == 200
            filler.unlink()  # space is back
            for _ in range(5):
                answer = client.post("/items", json={"vectors": rng.normal(size=(2, DIM)).tolist()})
                assert answer.status_code == 201, answer.text
                acknowledged.extend(answer.json()["ids"])
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        _, records = Journal(
            journal_path(index_path), DPQIndex.load(index_path).codebook_sha256
        ).read()
        ids = [i for record in records for i in record.payload["ids"]]
        assert sorted(ids) == sorted(acknowledged)  # each acknowledged id once, no other
        log = (tmp_path / "first.log").read_text()
        assert "Traceback" not in log, log
        process, url = _start_server(index_path, tmp_path / "second.log")
        try:
            with httpx.Client(base_url=url, timeout=10) as client:
                assert client.get("/health").json()["items"] == 500 + len(acknowledged)
                for item_id in acknowledged[::7]:
                    assert client.get(f"/items/{item_id}").status_code == 200
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, timeout=60)


def test_an_older_index_file_beside_a_newer_journal_is_refused(built, tmp_path, capsys):
    """Issue 24: the journal's writes were replayed onto whatever index file was there.
    Now the journal names the index state it continues: another one is refused (exit 2,
    naming both), unless --force-journal."""
    from dpq.cli import build_parser, main
    from dpq.serve import open_collection

    index_path = _copy_index(built["vectors"], tmp_path)
    older = tmp_path / "older.index.npz"
    shutil.copy(index_path, older)  # a backup of the 500-item index
    collection = open_collection(ServeSettings(index_path))
    rng = np.random.default_rng(0)
    collection.add(rng.normal(size=(2, DIM)))
    collection.compact()  # the index file holds 502 items; the journal continues it
    later = collection.add(rng.normal(size=(3, DIM)))
    collection.journal.close()  # a crash: the 3 adds are in the journal only
    shutil.copy(older, index_path)  # the backup restored over the index file
    assert main(["serve", "--index", str(index_path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "continues an index of 502 items" in err and "holds 500 items" in err
    assert "--force-journal" in err and err.count("\n") == 1
    assert DPQIndex.load(index_path).ntotal == 500  # nothing was replayed or saved
    assert build_parser().parse_args(["serve", "--index", "x", "--force-journal"]).force_journal
    forced = open_collection(ServeSettings(index_path, force_journal=True))
    assert forced.index.ntotal == 503 and forced.index.contains(later).all()
    forced.close()


# ---------------------------------------------------------------- ties, filters, batches (24)


def test_tie_groups_at_8_bits_are_reported_and_stable(service, built):
    """At 8 bits every item of the query's first-level cell is at one distance: the answer
    lists that group, orders it by a hash (not by id), and gives the same order twice."""
    client, _ = service
    index = DPQIndex.load(built["index"])
    request = {"id": 7, "k": 24, "bits": 8, "exclude_query": False}
    body = client.post("/search", json=request).json()
    assert body == {**client.post("/search", json=request).json(), "took_ms": body["took_ms"]}
    vector = index.decode(index.codes[7:8])[0]
    ids, distances = _tie_ordered(index, vector, index.ntotal, num_levels=1)
    expected = []  # groups of the whole reference ranking that meet ranks 0..23
    start = 0
    for end in [*np.flatnonzero(distances[1:] != distances[:-1]) + 1, len(distances)]:
        if start < 24 and end - start >= 2:
            expected.append({"start": start, "end": int(end), "complete": True})
        start = int(end)
    assert [{k: g[k] for k in ("start", "end", "complete")} for g in body["tie_groups"]] == expected
    assert expected and expected[0]["start"] == 0  # the query's own cell ties at rank 0
    first = expected[0]
    shown = [r["id"] for r in body["results"]][first["start"] : min(first["end"], 24)]
    assert shown != sorted(shown)  # not in id (and so not in class) order
    for group in body["tie_groups"]:
        inside = body["results"][group["start"] : min(group["end"], 24)]
        assert {r["distance"] for r in inside} == {group["distance"]}


def test_label_filter_exclusions_and_codes(service, built):
    client, _ = service
    index = DPQIndex.load(built["index"])
    threes = int((index.labels == 3).sum())
    body = client.post(
        "/search",
        json={"id": 7, "k": 30, "filter": {"labels": ["3"]}, "exclude": [int(np.flatnonzero(index.labels == 3)[0])], "with_codes": True},
    ).json()  # fmt: skip
    assert body["matching"] == threes and len(body["results"]) == 30
    assert {r["label"] for r in body["results"]} == {"3"}
    vector = index.decode(index.codes[7:8])[0]
    ids, _ = _tie_ordered(index, vector, index.ntotal)
    excluded = int(np.flatnonzero(index.labels == 3)[0])
    wanted = [i for i in ids.tolist() if index.labels[i] == 3 and i not in (7, excluded)][:30]
    assert [r["id"] for r in body["results"]] == wanted
    for result in body["results"][:5]:
        assert result["codes"] == index.codes_of([result["id"]])[0].tolist()
    few = client.post("/search", json={"id": 7, "k": 1000, "filter": {"labels": [3, "5"]}}).json()
    assert len(few["results"]) == few["matching"] == threes + int((index.labels == 5).sum())
    plain = client.post("/search", json={"id": 7, "k": 3}).json()
    assert plain["matching"] is None and "codes" not in plain["results"][0]
    assert 7 not in [r["id"] for r in plain["results"]]  # an item query leaves itself out


def test_batch_search_is_one_index_search_and_equals_single_queries(service, built):
    client, app = service
    index = app.state.service.collection.index
    vector = np.random.default_rng(8).normal(size=DIM).tolist()
    queries = [{"id": 7}, {"vector": vector}, {"id": 1000}]
    options = {"k": 9, "bits": 16, "filter": {"labels": ["1", "7"]}, "offset": 2}
    calls = []
    search = index.search

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return search(*args, **kwargs)

    index.search = counted
    try:
        plain = client.post("/search/batch", json={"queries": queries, "k": 9})
        assert plain.status_code == 200, plain.text
        assert calls == [3]  # one search for all three queries
        calls.clear()
        batch = client.post("/search/batch", json={"queries": queries, **options})
    finally:
        del index.search
    assert batch.status_code == 200, batch.text
    assert calls[0] == 3 and len(calls) <= 3  # more only for a query that needs more
    body = batch.json()
    assert body["bits"] == 16 and body["k"] == 9 and len(body["responses"]) == 3
    for query, answer in zip(queries, body["responses"], strict=True):
        single = client.post("/search", json={**query, **options}).json()
        assert answer["results"] == single["results"] and answer["query"] == single["query"]
        assert answer["tie_groups"] == single["tie_groups"]
    for wrong, phrase in [
        ({"queries": [{"id": 7, "vector": vector}]}, "exactly one of 'vector' or 'id'"),
        ({"queries": [{"id": 999_999}]}, "no item with id 999999"),
        ({"queries": [{"vector": [0.0] * 3}]}, "expects 16"),
    ]:
        answer = client.post("/search/batch", json=wrong)
        assert answer.status_code in (404, 422) and phrase in answer.text, answer.text
    assert client.post("/search/batch", content=b'{"queries": [{"id": 1}]}',
                       headers={"content-type": "text/plain"}).status_code == 415  # fmt: skip


def test_items_listing_and_full_size_images(service):
    client, _ = service
    page = client.get("/items", params={"offset": 10, "limit": 5}).json()
    assert [item["id"] for item in page["items"]] == [10, 11, 12, 13, 14]
    assert (page["offset"], page["limit"], page["total"]) == (10, 5, 1797)
    assert page["items"][0]["full_image_url"] == "/items/10/image/full"
    assert client.get("/items", params={"offset": 1795}).json()["items"][-1]["id"] == 1796
    assert client.get("/items", params={"limit": 0}).status_code == 422
    assert client.get("/items", params={"limit": 1001}).status_code == 422
    full = client.get("/items/10/image/full")
    assert full.status_code == 200 and full.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(full.content)) as picture:
        assert picture.size == (8, 8)  # the digit at its own size (the thumbnail is 128)


def test_item_metadata_names_its_file_and_serves_it_full_size(built, tmp_path):
    """A folder source: an item's metadata names its file relative to the collection, and
    /image/full decodes that file at its own size (16 x 16), not the model's 8 x 8."""
    from conftest import make_image_folder

    made = make_image_folder(tmp_path / "photos", {"cats": 2, "dogs": 2}, size=16)
    index = DPQIndex(DPQIndex.load(built["vectors"]).codebooks)
    index.add_features(np.random.default_rng(0).normal(size=(4, DIM)).astype(np.float32))
    path = index.save(tmp_path / "photos.index.npz")
    app = create_app(ServeSettings(path, images=str(tmp_path / "photos"), image_size=8))
    with running(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        item = client.get("/items/3").json()
        assert item["metadata"] == {"source": "photos", "row": 3, "file": "dogs/001.png"}
        full = client.get(item["full_image_url"])
        with Image.open(io.BytesIO(full.content)) as picture:
            assert np.array_equal(np.asarray(picture.convert("RGB")), made["dogs"][1])


def test_filters_on_multi_label_items(built, tmp_path):
    index = DPQIndex(
        DPQIndex.load(built["vectors"]).codebooks, metadata={"classes": ["sea", "sky", "sun"]}
    )
    tags = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1], [1, 1, 1], [0, 0, 1]] * 4, np.uint8)
    index.add_features(
        np.random.default_rng(2).normal(size=(20, DIM)).astype(np.float32), labels=tags
    )
    path = index.save(tmp_path / "tags.index.npz")
    with running(create_app(ServeSettings(path))) as url, httpx.Client(base_url=url) as client:
        assert client.get("/stats").json()["multi_label"] is True
        vector = [0.0] * DIM

        def found(labels, match):
            body = {"vector": vector, "k": 20, "filter": {"labels": labels, "match": match}}
            return client.post("/search", json=body).json()["results"]

        both = found(["sea", "sky"], "all")
        assert len(both) == 8 and all({"sea", "sky"} <= set(r["label"]) for r in both)
        either = found(["sea", "sky"], "any")
        assert len(either) == 16 and all({"sea", "sky"} & set(r["label"]) for r in either)
        assert len(found(["sun"], "all")) == 12


def test_collapsed_codes_are_reported_at_startup_and_in_stats(built, tmp_path):
    """Issue 24: a model whose items share a handful of codes served its ties as rankings
    without a word. The startup log and /stats now say how the codes are used, and warn."""
    books = DPQIndex.load(built["vectors"]).codebooks
    collapsed = DPQIndex(books)
    codes = np.zeros((400, LEVELS), np.uint8)
    codes[:, 0] = np.arange(400) % 5  # 5 distinct codes for 400 items
    collapsed.add(codes)
    path = collapsed.save(tmp_path / "collapsed.index.npz")
    said: list[str] = []
    app = create_app(ServeSettings(path), log=said.append)
    assert said[0] == "distinct codes of 400 items: 8 bits 5, 16 bits 5, 24 bits 5, 32 bits 5"
    assert said[1].startswith("warning: the codes have collapsed: 400 items have only 5 ")
    assert [line.split(" (")[0] for line in said[2:]] == [
        f"warning: level {level} is nearly constant" for level in (2, 3, 4)
    ]
    with running(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        stats = client.get("/stats").json()
        assert stats["warnings"] == [line.removeprefix("warning: ") for line in said[1:]]
        assert [level["prefixes"] for level in stats["code_usage"]["levels"]] == [5, 5, 5, 5]
        body = client.post("/search", json={"vector": [0.0] * DIM, "k": 10}).json()
        assert body["tie_groups"][0]["start"] == 0 and body["tie_groups"][0]["end"] == 80
    healthy: list[str] = []
    fine = create_app(ServeSettings(_copy_index(built["vectors"], tmp_path)), log=healthy.append)
    assert not [line for line in healthy if line.startswith("warning")]
    fine.state.service.close()


def test_an_image_query_says_what_the_model_predicts(service, built):
    """For the page (issue 24, finding 7): an uploaded image's label is the model's own
    prediction, given with the answer, not the label of the item shown before."""
    import torch

    from dpq.model.network import DPQModel
    from dpq.serve.images import decode_upload, model_input

    client, _ = service
    data = _png((20, 14), seed=5)
    model = DPQModel.from_checkpoint(built["model"])
    pixels = model_input(decode_upload(data, "q.png"), (8, 8))
    _, logits = model.extract_features_and_logits(pixels[None])
    probabilities = torch.softmax(torch.from_numpy(logits[0]).double(), 0).numpy()
    answer = client.post("/search", files={"file": ("q.png", data, "image/png")}).json()
    assert answer["query"]["predicted_label"] == str(int(probabilities.argmax()))
    assert answer["query"]["predicted_probability"] == pytest.approx(probabilities.max(), abs=1e-4)
    assert "predicted_label" not in client.post("/search", json={"id": 3}).json()["query"]


class _GatedForward:
    """A served model's forward pass held at a gate on its first call, recording each
    pass's batch size."""

    def __init__(self, model) -> None:
        self.model, self.sizes = model, []
        self.entered, self.release = threading.Event(), threading.Event()

    def extract_features_and_logits(self, images: np.ndarray, batch_size: int):
        self.sizes.append(len(images))
        if len(self.sizes) == 1:
            self.entered.set()
            assert self.release.wait(20), "the test never opened the gate"
        return self.model.extract_features_and_logits(images, batch_size=batch_size)


def test_image_queries_wait_for_the_model_without_holding_a_search_thread(built, tmp_path):
    """One search thread, six concurrent image queries: while the model's first pass is
    held, the five others are still decoded and queued for the model (no search thread
    waits for it), then go through it as one pass of five; each answer equals the one the
    same image gets alone (up to the rounding of another batch size)."""
    settings = ServeSettings(_copy_index(built["index"], tmp_path), built["model"], "digits",
                             threads=1)  # fmt: skip
    app = create_app(settings)
    uploads = [_png((12, 10), seed=20 + i) for i in range(6)]
    answers: dict[int, dict] = {}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        encoder = app.state.service.collection.model()
        gated = _GatedForward(encoder._model)
        encoder._model = gated

        def ask(i: int) -> None:
            files = {"file": ("q.png", uploads[i], "image/png")}
            answers[i] = client.post("/search", files=files, data={"k": "5"}).json()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        try:
            threads[0].start()
            assert gated.entered.wait(20), "the first query never reached the model"
            for thread in threads[1:]:
                thread.start()
            wait_until(lambda: encoder._queue.qsize() >= 5, 20, "five queries at the model")
        finally:
            gated.release.set()
        join_threads(threads, 30, "the six image queries")
        together = [answers[i]["results"] for i in range(6)]
        for i in range(6):  # one at a time now
            ask(i)
    assert gated.sizes == [1, 5] + [1] * 6
    for i, results in enumerate(together):  # equal up to the rounding of a batch of 5 vs 1
        assert len(results) == 5
        alone = [r["distance"] for r in answers[i]["results"]]
        assert [r["distance"] for r in results] == pytest.approx(alone, rel=1e-3, abs=1e-6)


def test_a_service_whose_model_runs_in_onnxruntime_answers_an_image_query(built, tmp_path):
    from conftest import needs_engine
    from dpq.model.network import DPQModel
    from dpq.serve.images import decode_upload, model_input

    needs_engine("onnxruntime")
    pytest.importorskip("onnxscript", reason="exporting needs the inference extra (onnxscript)")
    model_dir = shutil.copytree(built["model"], tmp_path / "model")  # the cache goes beside it
    settings = ServeSettings(
        _copy_index(built["index"], tmp_path), model_dir, "digits", engine="onnxruntime"
    )
    data = _png((20, 14), seed=5)
    pixels = model_input(decode_upload(data, "q.png"), (8, 8))
    features = DPQModel.from_checkpoint(model_dir).extract_features(pixels[None])[0]
    ids, _ = _tie_ordered(DPQIndex.load(built["index"]), features, 12, num_levels=2)
    with running(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        answer = client.post(
            "/search", files={"file": ("q.png", data, "image/png")}, data={"k": "12", "bits": "16"}
        )
        stats = client.get("/stats").json()
    assert answer.status_code == 200, answer.text
    assert [r["id"] for r in answer.json()["results"]] == ids.tolist()
    assert "onnxruntime" in json.dumps(stats)
