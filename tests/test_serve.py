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
    ],
)
def test_search_errors(service, body, status, phrase):
    client, _ = service
    answer = client.post("/search", json=body)
    assert answer.status_code == status, answer.text
    assert phrase in json.dumps(answer.json()["detail"])


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
        deadline = time.monotonic() + 30
        while len(acknowledged) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)  # mid-stream: requests are in flight
        process.wait(10)
    finally:
        stop.set()
        for thread in writers:
            thread.join(10)
        if process.poll() is None:
            process.kill()
    assert len(acknowledged) >= 60 and failures, "the kill did not interrupt the stream"
    assert DPQIndex.load(index_path).ntotal == 500  # the index file itself is whole
    process, url = _start_server(index_path, tmp_path / "second.log")
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
            while not seen:
                time.sleep(0.005)
            for _ in range(6):
                answer = client.post("/items", json={"vectors": [target.tolist()] * 50})
                assert answer.status_code == 201
        adds_done.set()
        for thread in searchers:
            thread.join(60)
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
            deadline = time.monotonic() + 10
            while "dpq_pending 1.0" not in client.get("/metrics").text:
                assert time.monotonic() < deadline, "the first search never started"
                time.sleep(0.01)
            busy = client.post("/search", json={"id": 2})
        first.join(10)
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
