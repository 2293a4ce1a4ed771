"""Running the app with uvicorn: on a socket bound here (so port 0 works and the real port
is printed), in the foreground (``dpq serve``) or on a background thread (tests, notebooks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from dpq.serve.settings import API_KEY_ENV, ServeSettings

__all__ = ["bind_socket", "exposure_warning", "freeze_startup_heap", "running", "serve"]

_ALL_ADDRESSES = ("0.0.0.0", "::", "")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: the system picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port "
            "(or stop the program using it)."
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def exposure_warning(host: str, api_key: str | None, open_writes: bool = False) -> str | None:
    """The warning for a bind address that every network can reach (None for others)."""
    if host not in _ALL_ADDRESSES:
        return None
    text = (
        f"--host {host or '0.0.0.0'} makes the service reachable from every network this "
        "machine is on"
    )
    if api_key is None and open_writes:
        return (
            text + "; writes are open to anyone who can reach it: set --api-key (or "
            "DPQ_API_KEY) instead of --allow-open-writes."
        )
    if api_key is None:
        return text + "; writes stay closed until --api-key (or DPQ_API_KEY) is set."
    return text + "."


def _config(app: Any, log_level: str, access_log: bool):
    import uvicorn

    return uvicorn.Config(
        app,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=10,
        lifespan="on",
    )


def freeze_startup_heap() -> int:
    """Collect, then move every object alive now (the imported libraries: torch, numba,
    FastAPI; the opened collection) out of the garbage collector's reach; returns how many.

    Without it every full collection under load walks those ~300,000 objects: at 1,000
    requests/s that was a 175 ms stop of the whole service every ~1.3 s, the p99 of every
    phase of benchmarks/serve_load.py. What the requests allocate afterwards is collected
    as before. Only for a process that serves until it exits (objects frozen here are never
    freed): `dpq serve`, not :func:`running`."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def serve(settings: ServeSettings) -> None:
    """Open the collection, bind ``settings.host``:``settings.port`` and serve until
    interrupted (``dpq serve``).

    Without ``settings.api_key`` the environment variable DPQ_API_KEY gives it. The startup
    line says who may write (the key, anyone: ``allow_open_writes``, or nobody). Binds
    127.0.0.1 unless told otherwise; 0.0.0.0 (every network the machine is on) prints a
    warning.
    """
    import uvicorn

    from dpq.serve.app import create_app, writes_note

    if settings.api_key is None and os.environ.get(API_KEY_ENV):
        settings = dataclasses.replace(settings, api_key=os.environ[API_KEY_ENV])
    host = settings.host
    warning = exposure_warning(host, settings.api_key, settings.allow_open_writes)
    if warning is not None:
        print(f"dpq serve: warning: {warning}", file=sys.stderr, flush=True)
    sock = bind_socket(host, settings.port)
    try:
        app = create_app(settings)
        freeze_startup_heap()
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        print(
            f"dpq serve: {len(app.state.service.collection):,} items at http://{shown}:{bound}/ "
            f"(API docs: /docs); {writes_note(settings)}; Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        config = _config(app, settings.log_level, settings.access_log)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


@contextlib.contextmanager
def running(
    app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0
) -> Iterator[str]:
    """Serve ``app`` on a background thread; yields its base URL ("http://127.0.0.1:PORT").

    On exit the server shuts down (lifespan shutdown included: the collection compacts).
    """
    import uvicorn

    sock = bind_socket(host, port)
    server = uvicorn.Server(_config(app, "warning", False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the server did not start (see the log above).")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
