"""Request limits as plain ASGI middleware: body size (413), rate per client (429).

The rate limit is a token bucket per client address: ``rate`` requests per second on
average, bursts of up to ``burst``. The clock is injected, so the timing logic is tested
without sleeping.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

__all__ = ["BodyLimit", "RateLimit", "TokenBuckets"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_json_error(
    send: Send, status: int, detail: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Answer a request with ``{"detail": ...}`` (the shape FastAPI uses for its errors)."""
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413: by Content-Length before reading,
    and by counting while reading (chunked uploads declare no length)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    def _detail(self) -> str:
        return (
            f"the request body is larger than the upload limit of {self.max_bytes:,} bytes; "
            "send a smaller image (or start the service with a larger --max-upload-mb)."
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await send_json_error(send, 413, self._detail(), [(b"connection", b"close")])
                    return
        received = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await send_json_error(send, 413, self._detail(), [(b"connection", b"close")])


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens per second refill, ``burst`` at most.

    ``take(key)`` returns 0.0 when a token was taken, else the seconds until one is there.
    At most ``max_keys`` buckets are kept (least recently used go first; a forgotten key
    starts full again). ``clock`` returns seconds (default ``time.monotonic``).
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError(f"rate must be a positive number of requests per second; got {rate}.")
        if burst < 1:
            raise ValueError(f"burst must be at least 1; got {burst}.")
        self.rate = float(rate)
        self.burst = int(burst)
        self.clock = clock
        self.max_keys = int(max_keys)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return wait


class RateLimit:
    """429 (with Retry-After) for a client address past its token bucket; paths starting
    with one of ``exempt`` (health checks, metrics, the page) are never limited."""

    def __init__(self, app: ASGIApp, buckets: TokenBuckets, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.buckets = buckets
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt) or scope["path"] == "/":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        wait = self.buckets.take(client[0] if client else "unknown")
        if wait > 0:
            await send_json_error(
                send,
                429,
                f"too many requests: this service allows {self.buckets.rate:g} per second per "
                f"client (bursts of {self.buckets.burst}); retry in {wait:.2f} s.",
                [(b"retry-after", str(max(1, math.ceil(wait))).encode())],
            )
            return
        await self.app(scope, receive, send)
