"""What one run of the service is configured with: :class:`ServeSettings`, validated once.

``dpq serve`` builds it from its flags; :func:`dpq.serve.create_app`, :func:`dpq.serve.serve`
and :func:`dpq.serve.open_collection` each take it whole instead of a long keyword list.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpq.inference.names import check_engine, check_precision
from dpq.serve.images import DEFAULT_MAX_PIXELS

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_BATCH_CONCURRENCY",
    "DEFAULT_BATCH_MAX",
    "DEFAULT_BATCH_WAIT_MS",
    "DEFAULT_COMPACT_BYTES",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "LOG_LEVELS",
    "ServeSettings",
]

# The environment variable `dpq serve` reads the write key from when --api-key is not given.
API_KEY_ENV = "DPQ_API_KEY"
DEFAULT_MAX_UPLOAD_BYTES = 10 * 2**20
# Compact (save the index, start a new journal) once the journal grows past this.
DEFAULT_COMPACT_BYTES = 64 * 2**20
# Micro-batching defaults (measured with benchmarks/serve_load.py; see docs/RESULTS.md).
DEFAULT_BATCH_MAX = 64
DEFAULT_BATCH_CONCURRENCY = 1
DEFAULT_BATCH_WAIT_MS = 2.0
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer; got {value!r}.")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"at least {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ValueError(f"{name} must be {bound}; got {value}.")


def _origins(value: Any) -> tuple[str, ...]:
    """``cors_origins`` as a tuple of "scheme://host[:port]" strings (no path, no slash)."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise TypeError(f"cors_origins must be a list of origins; got {value!r}.")
    for origin in value:
        scheme, _, rest = str(origin).partition("://")
        if scheme not in ("http", "https") or not rest or "/" in rest or origin == "*":
            raise ValueError(
                f"a CORS origin is scheme://host[:port] with no path, such as "
                f"https://app.example; got {origin!r}."
            )
    return tuple(str(origin) for origin in value)


def _check_optional_str(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name} must be a non-empty string or None; got {value!r}.")


@dataclass(frozen=True)
class ServeSettings:
    """The service's settings (frozen; checked on construction with one-sentence errors).

    What is served:
        index: an index file from ``dpq encode``; its journal is ``<index>.journal``.
        model: its model's checkpoint directory: queries and adds may then be images.
        images: the source the index was encoded from (ids = row numbers): thumbnails.
        image_root: list-file sources: the folder or zip of the images.
        image_size: the square size the model reads (default: the model's trained size, else
            the source's image size).
        device: where the model runs ("auto", "cpu", "cuda", "cuda:N", "mps").
        model_threads: threads of the model's forward pass (None: the engine's default).
        engine: who runs the model's network: "torch" (the checkpoint), "onnxruntime" or
            "openvino" (its ONNX export on the CPU; these give no predicted labels).
        onnx: with an ONNX engine: an export of ``model`` (``dpq export --onnx``) read at the
            served image size; None: exported once into ``MODEL_DIR/engine-cache/``.
        engine_precision: the engine's arithmetic, "fp32", "bf16" (torch autocast,
            OpenVINO's bfloat16 inference) or "int8" (an ONNX engine running the int8
            export given as ``onnx``, from ``dpq export --onnx --int8``).

    Limits and safety:
        api_key: required (header ``X-API-Key`` or ``Authorization: Bearer``) for POST /items
            and DELETE /items/{id}. :func:`dpq.serve.serve` takes it from the environment
            variable DPQ_API_KEY when this is None.
        allow_open_writes: without an api_key, writes are refused (403) unless this is True.
            Either way a write from another site (an ``Origin`` other than the service's own
            or those of ``cors_origins``, or ``Sec-Fetch-Site: cross-site``) gets 403.
        cors_origins: origins (``https://app.example``) whose pages may call the API (CORS);
            none by default.
        max_upload_bytes: larger request bodies get 413.
        max_image_pixels: images declaring more pixels get 422 (decompression bombs).
        rate_limit: requests per second per client address (0: no limit); ``rate_burst``
            the bucket size (None: max(1, 2 x rate)).
        threads: search threads (None: the CPU count).
        max_pending: requests running or waiting beyond this get 503.

    Micro-batching (:mod:`dpq.serve.batching`; single searches only, ``/search/batch`` is
    batched by its client):
        batch_max: queries searched together in one index call at most (1: each query alone,
            no batching).
        batch_concurrency: batched index searches running at once (default 1: the scan
            of a large index spreads over every core itself, and the queries arriving
            meanwhile go out together when it ends, so batches grow with the load; at
            1M items, 50 clients, 2 cores it served 1,008-1,304 requests/s against
            851-1,054 with 2 at once, docs/RESULTS.md).
        batch_wait_ms: with ``batch_concurrency`` above 1, how long a query may wait for
            others while a search is already running and a slot is free (an idle service
            searches at once; 0: never wait). With one slot nothing waits for it: a query
            goes out as soon as the running search ends.

    Storage:
        thumbnail_size: longer side of thumbnails in pixels.
        compact_bytes: compact the journal once it is larger than this.
        fsync: fsync each journal append (keep on; off only for throw-away data).
        force_journal: replay the journal even when it continues another state of the index
            than the index file holds (see :mod:`dpq.serve.journal`).

    The server (:func:`dpq.serve.serve` only):
        host, port: where to listen (port 0: any free port).
        access_log: log every request; log_level: uvicorn's log level.
    """

    index: Path
    model: Path | None = None
    images: str | None = None
    image_root: str | None = None
    image_size: int | None = None
    device: str = "cpu"
    model_threads: int | None = None
    engine: str = "torch"
    onnx: Path | None = None
    engine_precision: str = "fp32"
    api_key: str | None = None
    allow_open_writes: bool = False
    cors_origins: tuple[str, ...] = ()
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    rate_limit: float = 0.0
    rate_burst: int | None = None
    threads: int | None = None
    max_pending: int = 256
    batch_max: int = DEFAULT_BATCH_MAX
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    batch_concurrency: int = DEFAULT_BATCH_CONCURRENCY
    thumbnail_size: int = 128
    compact_bytes: int = DEFAULT_COMPACT_BYTES
    fsync: bool = True
    force_journal: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    access_log: bool = False
    log_level: str = "warning"

    def __post_init__(self) -> None:
        if not isinstance(self.index, str | os.PathLike) or not str(self.index):
            raise ValueError(f"index must be the path of an index file; got {self.index!r}.")
        object.__setattr__(self, "index", Path(self.index))
        if self.model is not None:
            if not isinstance(self.model, str | os.PathLike) or not str(self.model):
                raise ValueError(
                    f"model must be a checkpoint directory or None; got {self.model!r}."
                )
            object.__setattr__(self, "model", Path(self.model))
        check_engine(self.engine, self.onnx)
        check_precision(self.engine, self.engine_precision)
        if self.engine != "torch" and self.model is None:
            raise ValueError(f"engine {self.engine!r} runs a model; set model to its checkpoint.")
        if self.onnx is not None:
            if not isinstance(self.onnx, str | os.PathLike) or not str(self.onnx):
                raise ValueError(
                    f"onnx must be the path of an ONNX file or None; got {self.onnx!r}."
                )
            object.__setattr__(self, "onnx", Path(self.onnx))
        for name in ("images", "image_root", "api_key"):
            _check_optional_str(name, getattr(self, name))
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a name such as 'cpu' or 'cuda'; got {self.device!r}.")
        for name in ("image_size", "model_threads", "rate_burst", "threads"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        for name in ("max_upload_bytes", "max_image_pixels", "max_pending", "thumbnail_size"):
            _check_int(name, getattr(self, name), 1)
        _check_int("compact_bytes", self.compact_bytes, 0)
        _check_int("batch_max", self.batch_max, 1, 4096)
        _check_int("batch_concurrency", self.batch_concurrency, 1, 256)
        wait = self.batch_wait_ms
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= 1000:
            raise ValueError(
                f"batch_wait_ms must be a number of milliseconds in 0..1000; got {wait!r}."
            )
        _check_int("port", self.port, 0, 65535)
        rate = self.rate_limit
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate):
            raise ValueError(f"rate_limit must be a number of requests per second; got {rate!r}.")
        if rate < 0:
            raise ValueError(f"rate_limit must be 0 (no limit) or positive; got {rate}.")
        object.__setattr__(self, "cors_origins", _origins(self.cors_origins))
        for name in ("fsync", "access_log", "allow_open_writes", "force_journal"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False; got {getattr(self, name)!r}.")
        if not isinstance(self.host, str):
            raise TypeError(
                f"host must be an address string such as '127.0.0.1'; got {self.host!r}."
            )
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}; got {self.log_level!r}.")

    @property
    def writes(self) -> str:
        """Who may write: "api-key" (requests with the key), "open" (anyone who can reach
        the service, from its own pages or without a browser) or "closed"."""
        if self.api_key is not None:
            return "api-key"
        return "open" if self.allow_open_writes else "closed"

    @property
    def search_threads(self) -> int:
        """Threads of the search pool: :attr:`threads`, or the CPU count."""
        return self.threads or os.cpu_count() or 2

    @property
    def batch_slots(self) -> int | None:
        """Batches searched at once: :attr:`batch_concurrency` when batching (queries
        gather while they run), None (no bound: each query goes to the pool at once) when
        :attr:`batch_max` is 1."""
        return None if self.batch_max == 1 else self.batch_concurrency

    @property
    def burst(self) -> int:
        """Bucket size of the rate limit: :attr:`rate_burst`, or max(1, 2 x rate)."""
        return self.rate_burst or max(1, int(2 * self.rate_limit))
