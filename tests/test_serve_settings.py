"""dpq.serve.settings: ServeSettings converts paths, keeps its defaults, and refuses each bad
field with one sentence naming it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from dpq.serve.settings import (  # noqa: E402
    DEFAULT_COMPACT_BYTES,
    DEFAULT_MAX_UPLOAD_BYTES,
    ServeSettings,
)


def test_defaults_and_path_conversion():
    settings = ServeSettings("db.index.npz", "runs/model", "digits")
    assert settings.index == Path("db.index.npz") and settings.model == Path("runs/model")
    assert settings.images == "digits" and settings.api_key is None
    assert (settings.host, settings.port, settings.device) == ("127.0.0.1", 8000, "cpu")
    assert settings.max_upload_bytes == DEFAULT_MAX_UPLOAD_BYTES == 10 * 2**20
    assert settings.compact_bytes == DEFAULT_COMPACT_BYTES and settings.fsync is True
    assert ServeSettings(Path("x")).model is None


def test_frozen():
    settings = ServeSettings("x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]
    assert dataclasses.replace(settings, port=0).port == 0


def test_derived_threads_and_burst():
    assert ServeSettings("x", threads=3).search_threads == 3
    assert ServeSettings("x").search_threads >= 1
    assert ServeSettings("x", rate_limit=2.5).burst == 5
    assert ServeSettings("x", rate_limit=0.2).burst == 1
    assert ServeSettings("x", rate_limit=2.5, rate_burst=9).burst == 9
    assert ServeSettings("x", threads=3).batch_slots == 1  # one batch at a time by default
    assert ServeSettings("x", batch_concurrency=3).batch_slots == 3  # batches gather while 3 run
    assert ServeSettings("x", threads=3, batch_max=1).batch_slots is None  # no batching
    batching = ServeSettings("x")
    assert (batching.batch_max, batching.batch_wait_ms, batching.batch_concurrency) == (64, 2.0, 1)


@pytest.mark.parametrize(
    ("fields", "error", "phrase"),
    [
        ({"index": ""}, ValueError, "index must be the path of an index file"),
        ({"index": 3}, ValueError, "index must be the path"),
        ({"model": ""}, ValueError, "model must be a checkpoint directory"),
        ({"images": ""}, ValueError, "images must be a non-empty string"),
        ({"api_key": ""}, ValueError, "api_key must be a non-empty string"),
        ({"device": ""}, ValueError, "device must be a name"),
        ({"image_size": 0}, ValueError, "image_size must be at least 1; got 0"),
        ({"image_size": 32.0}, TypeError, "image_size must be an integer"),
        ({"threads": True}, TypeError, "threads must be an integer"),
        ({"model_threads": -1}, ValueError, "model_threads must be at least 1"),
        ({"rate_burst": 0}, ValueError, "rate_burst must be at least 1"),
        ({"max_upload_bytes": 0}, ValueError, "max_upload_bytes must be at least 1"),
        ({"max_image_pixels": 0}, ValueError, "max_image_pixels must be at least 1"),
        ({"max_pending": 0}, ValueError, "max_pending must be at least 1"),
        ({"thumbnail_size": 0}, ValueError, "thumbnail_size must be at least 1"),
        ({"batch_max": 0}, ValueError, "batch_max must be in 1..4096; got 0"),
        ({"batch_max": 2.0}, TypeError, "batch_max must be an integer"),
        ({"batch_concurrency": 0}, ValueError, "batch_concurrency must be in 1..256; got 0"),
        ({"batch_wait_ms": -1}, ValueError, "batch_wait_ms must be a number of milliseconds"),
        ({"batch_wait_ms": float("nan")}, ValueError, "batch_wait_ms must be a number"),
        ({"batch_wait_ms": "2"}, ValueError, "batch_wait_ms must be a number"),
        ({"compact_bytes": -1}, ValueError, "compact_bytes must be at least 0"),
        ({"port": 70_000}, ValueError, "port must be in 0..65535"),
        ({"rate_limit": -1.0}, ValueError, "rate_limit must be 0 (no limit) or positive"),
        ({"rate_limit": float("inf")}, ValueError, "rate_limit must be a number"),
        ({"rate_limit": "fast"}, ValueError, "rate_limit must be a number"),
        ({"fsync": 1}, TypeError, "fsync must be True or False"),
        ({"access_log": "yes"}, TypeError, "access_log must be True or False"),
        ({"host": None}, TypeError, "host must be an address string"),
        ({"log_level": "loud"}, ValueError, "log_level must be one of"),
        ({"allow_open_writes": "yes"}, TypeError, "allow_open_writes must be True or False"),
        ({"force_journal": 1}, TypeError, "force_journal must be True or False"),
        ({"cors_origins": "https://a.example"}, TypeError, "cors_origins must be a list"),
        ({"cors_origins": ("*",)}, ValueError, "a CORS origin is scheme://host"),
        ({"cors_origins": ("https://a.example/app",)}, ValueError, "with no path"),
        ({"cors_origins": ("a.example",)}, ValueError, "got 'a.example'"),
        ({"model": "m", "engine": "tvm"}, ValueError, "unknown engine 'tvm'; choose one of"),
        ({"engine": "openvino"}, ValueError, "engine 'openvino' runs a model; set model"),
        (
            {"model": "m", "engine": "onnxruntime", "engine_precision": "bf16"},
            ValueError,
            "the onnxruntime engine runs precision fp32 or int8, not 'bf16'",
        ),
        ({"model": "m", "onnx": "e.onnx"}, ValueError, "is run by the onnxruntime or openvino"),
        ({"model": "m", "engine": "onnxruntime", "onnx": 3}, ValueError, "onnx must be the path"),
    ],
)
def test_bad_fields_are_refused(fields, error, phrase):
    with pytest.raises(error, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        ServeSettings(**{"index": "db.index.npz", **fields})


def test_edges_are_accepted():
    settings = ServeSettings("x", port=0, compact_bytes=0, rate_limit=0, host="")
    assert (settings.port, settings.compact_bytes, settings.host) == (0, 0, "")
    assert ServeSettings("x", port=65535, log_level="debug").port == 65535


def test_writes_are_closed_unless_a_key_or_open_writes():
    """Issue 24: writes were open by default."""
    assert ServeSettings("x").writes == "closed"
    assert ServeSettings("x", allow_open_writes=True).writes == "open"
    assert ServeSettings("x", api_key="k", allow_open_writes=True).writes == "api-key"
    origins = ServeSettings("x", cors_origins=["https://a.example", "http://127.0.0.1:3000"])
    assert origins.cors_origins == ("https://a.example", "http://127.0.0.1:3000")
    assert ServeSettings("x").cors_origins == () and ServeSettings("x").force_journal is False
