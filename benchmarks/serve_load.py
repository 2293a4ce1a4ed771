"""Load test of `dpq serve` on loopback, beside the in-process DPQIndex.search rate (issue 13).

Scenarios (each starts its own `dpq serve` subprocess on 127.0.0.1, port chosen by the OS):
  vectors  N synthetic items (default 1,000,000; D=300, L=4, K=256), vector queries (JSON)
  images   a database encoded by `dpq encode` (--index, e.g. CIFAR-10's 54,000 items) with
           its model (--model): image queries (JPEG uploads) decoded and encoded by the model
and, for each, a mix in which --add-fraction of the requests (default 5 %) are adds; for
vectors also a phase of batch requests (POST /search/batch with --batch queries each, default
16): the same queries as the single-query phase, so searches/s (queries answered per second)
compares batch against single queries at equal work. The server runs with
--allow-open-writes (writes are closed by default; the adds come from no browser page).

For every closed-loop phase, --clients concurrent clients (default 50) send requests back
to back for --seconds (default 30); the table gives requests/s, latency p50/p95/p99, errors
(anything but 2xx, or no answer), and the in-process rate of the same queries measured in the
same run: one query per DPQIndex.search call (plus decode and model for images), one thread.
Server and clients share this machine's cores: the CPU seconds of each are printed.

Open loop (issue 25): after the closed-loop phase has measured the capacity (its requests/s),
requests arrive at a fixed rate, --open-loop fractions of it (default 50 %, 80 %, 95 %),
Poisson (default) or evenly spaced (--arrivals), whatever the answers do; latency counts
from each request's scheduled time (no coordinated omission), and requests the client could
not send in time show as lag.

Micro-batching (issue 25): --batching both (default) runs every scenario twice, on a fresh
copy of the index each time, with the service's micro-batching off (--batch-max 1: one index
search per request, as before) and on (the service's defaults, or --batch-max /
--batch-wait-ms); the last table gives "on" against "off" phase by phase, and "mean batch"
is the queries per index search the service reports (/metrics).

Durability cost: the latency of an acknowledged add (journal append + fsync, from the mix)
beside what saving the whole index atomically (the alternative) takes at this size.

    python benchmarks/serve_load.py --scenario vectors                       # 1M items
    python benchmarks/serve_load.py --scenario images --index db.index.npz \
        --model runs/m/model --images cifar10-jpeg.zip --split split.json
    python benchmarks/serve_load.py --scenario vectors --items 20000 --seconds 5  # quick check
    python benchmarks/serve_load.py --scenario vectors --partition-levels 2 --nprobe 64

Loopback only, bounded in time (each phase stops after --seconds), never run by CI.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# uvicorn closes a keep-alive connection idle for 5 s; the open loop does not reuse one idle
# for 4 s, or a request sent as the server closes it fails as no answer (IncompleteReadError)
STALE_CONNECTION_SECONDS = 4.0


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=["vectors", "images", "all"], default="vectors")
    parser.add_argument(
        "--n", "--items", dest="n", type=int, default=1_000_000, help="synthetic items (vectors)"
    )
    parser.add_argument("--dim", type=int, default=300, help="synthetic feature dimension")
    parser.add_argument("--index", help="images: the index from `dpq encode`")
    parser.add_argument("--model", help="images: the checkpoint that built --index")
    parser.add_argument("--images", help="images: the source the index was encoded from")
    parser.add_argument("--split", help="images: the split; query images are its query rows")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--add-fraction", type=float, default=0.05, help="adds in the mix")
    parser.add_argument("--k", type=int, default=20, help="results per query")
    parser.add_argument(
        "--batch",
        type=int,
        default=16,
        help="vectors: queries per batch request (0: no batch phase)",
    )
    parser.add_argument("--bits", type=int, default=None, help="code length (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="server search threads")
    parser.add_argument(
        "--partition-levels",
        type=int,
        default=0,
        choices=[0, 1, 2],
        help="vectors: group the synthetic index by its first 0, 1 or 2 codes",
    )
    parser.add_argument(
        "--nprobe", type=int, default=None, help="vectors: cells scanned per query (partitioned)"
    )
    parser.add_argument(
        "--model-threads", type=int, default=None, help="images: the server's torch threads"
    )
    parser.add_argument(
        "--engine",
        default="torch",
        choices=["torch", "onnxruntime", "openvino"],
        help="images: the server's --engine",
    )
    parser.add_argument(
        "--engine-precision",
        default="fp32",
        choices=["fp32", "bf16", "int8"],
        help="images: the server's --engine-precision (int8 needs --onnx)",
    )
    parser.add_argument(
        "--onnx",
        default=None,
        help="images: the server's --onnx (an export of --model, e.g. `dpq export --int8`)",
    )
    parser.add_argument(
        "--batching",
        choices=["off", "on", "both"],
        default="both",
        help="the service's micro-batching: off (--batch-max 1), on, or both in turn",
    )
    parser.add_argument("--batch-max", type=int, help="on: the server's --batch-max")
    parser.add_argument("--batch-wait-ms", type=float, help="on: the server's --batch-wait-ms")
    parser.add_argument(
        "--batch-concurrency", type=int, help="on: the server's --batch-concurrency"
    )
    parser.add_argument(
        "--open-loop",
        default="0.5,0.8,0.95",
        help="open-loop arrival rates as fractions of the closed-loop capacity ('': none)",
    )
    parser.add_argument(
        "--arrivals", choices=["poisson", "uniform"], default="poisson", help="open loop"
    )
    parser.add_argument(
        "--open-loop-of",
        choices=["own", "off"],
        default="own",
        help="open-loop rates: fractions of each mode's own capacity, or of batching off's",
    )
    parser.add_argument(
        "--max-connections", type=int, default=1000, help="open loop: connections at most"
    )
    parser.add_argument("--queries", type=int, default=500, help="distinct queries")
    parser.add_argument("--baseline-seconds", type=float, default=10.0, help="in-process timing")
    parser.add_argument(
        "--workdir", help="where to write the synthetic index (default: a temp dir)"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


# ---------------------------------------------------------------- data


def synthetic_index(n: int, dim: int, seed: int, partition_levels: int = 0):
    """DPQIndex of n random codes over residual-style codebooks (scale halves per level), and
    float32 queries (decoded items plus noise), as benchmarks/search_speed.py builds them."""
    from dpq.index import DPQIndex

    rng = np.random.default_rng(seed)
    levels, k = 4, 256
    books = np.stack([rng.normal(scale=0.5**level, size=(k, dim)) for level in range(levels)])
    index = DPQIndex(books.astype(np.float32), partition_levels=partition_levels)
    index.add(rng.integers(0, k, size=(n, levels)))
    return index


def vector_queries(index, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    rows = rng.integers(0, index.ntotal, size=count)
    decoded = index.decode(index.codes[rows])
    return (decoded + rng.normal(scale=0.1, size=decoded.shape)).astype(np.float32)


def image_queries(args: argparse.Namespace, count: int) -> tuple[list[bytes], tuple[int, int]]:
    """JPEG bytes (quality 95) of the split's first query images, and the source's image
    size (height, width), which the service gives the model."""
    from PIL import Image

    from dpq.data.splits import Split
    from dpq.serve.sources import load_image_source

    source = load_image_source(args.images)
    rows = Split.load(args.split).query[:count]
    out = []
    for row in rows:
        buffer = io.BytesIO()
        Image.fromarray(source.images[row]).save(buffer, format="JPEG", quality=95)
        out.append(buffer.getvalue())
    return out, (int(source.images.shape[1]), int(source.images.shape[2]))


# ---------------------------------------------------------------- in-process baseline


def in_process_rate(job, count: int, seconds: float) -> float:
    """Calls of job(i) per second, one at a time on this thread, for about ``seconds``."""
    for i in range(min(count, 5)):  # warm up (compilation, caches)
        job(i)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        job(done % count)
        done += 1
    return done / (time.perf_counter() - started)


# ---------------------------------------------------------------- the server


class Server:
    """`dpq serve` in a subprocess on 127.0.0.1, port 0; stopped with SIGTERM."""

    def __init__(self, index: str, *extra: str) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "dpq.cli", "serve", "--index", index, "--port", "0"]
        self.process = subprocess.Popen(
            [*command, *extra], stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            text = Path(self.log.name).read_text()
            if " items at http://" in text:
                self.url = text.split(" items at ")[1].split("/ ")[0]
                self.port = int(self.url.rsplit(":", 1)[1])
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.process.kill()
        raise RuntimeError(f"dpq serve did not start:\n{Path(self.log.name).read_text()}")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> float:
        """SIGTERM (graceful: the journal is compacted into the index); returns seconds."""
        started = time.perf_counter()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(300)
        except subprocess.TimeoutExpired:
            self.process.kill()
        return time.perf_counter() - started


# ---------------------------------------------------------------- the load


def http_request(method: str, path: str, body: bytes, content_type: str) -> bytes:
    """The bytes of one HTTP/1.1 keep-alive request (built once, sent many times)."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def json_request(path: str, payload: dict) -> bytes:
    return http_request("POST", path, json.dumps(payload).encode(), "application/json")


def multipart_request(path: str, field: str, data: bytes, fields: dict[str, str]) -> bytes:
    boundary = "dpqloadboundary7MA4YWxk"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields.items()
    ]
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
        f'filename="q.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    )
    body = "".join(parts).encode() + head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return http_request("POST", path, body, f"multipart/form-data; boundary={boundary}")


async def _exchange(reader, writer, request: bytes) -> tuple[int, bytes]:
    """Send one request on a keep-alive connection; (status, body) of the answer."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, await reader.readexactly(length)


async def _load(
    port: int,
    searches: list[bytes],
    adds: list[bytes],
    add_fraction: float,
    clients: int,
    seconds: float,
    seed: int,
) -> dict[str, list]:
    """``clients`` connections sending prepared requests back to back until the deadline.

    A minimal HTTP/1.1 client on asyncio streams: the requests are built beforehand, so the
    load generator, which shares the cores with the server, spends almost nothing per request
    (an httpx.AsyncClient took ~7 ms of CPU per request here and was the bottleneck)."""
    results: dict[str, list] = {"search": [], "add": [], "errors": []}
    deadline = time.perf_counter() + seconds

    async def one_client(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                kind = "add" if rng.random() < add_fraction else "search"
                pool = adds if kind == "add" else searches
                started = time.perf_counter()
                try:
                    status, body = await asyncio.wait_for(
                        _exchange(reader, writer, pool[rng.randrange(len(pool))]), 60
                    )
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                    results["errors"].append(f"{type(exc).__name__}: {exc}")
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                if 200 <= status < 300:
                    results[kind].append(time.perf_counter() - started)
                else:
                    results["errors"].append(f"HTTP {status}: {body[:120]!r}")
        finally:
            writer.close()

    wall = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    results["wall"] = [time.perf_counter() - wall]
    return results


async def _open_loop(
    port: int,
    searches: list[bytes],
    rate: float,
    seconds: float,
    seed: int,
    arrivals: str,
    max_connections: int,
) -> dict[str, list]:
    """Requests sent at ``rate`` per second for ``seconds`` (Poisson or evenly spaced
    arrivals), each on an idle keep-alive connection or a new one, whether or not earlier
    ones were answered. Latency counts from the scheduled time; ``lag`` is how late each
    request left (the client's own delay)."""
    rng = random.Random(seed)
    results: dict[str, list] = {"search": [], "errors": [], "lag": []}
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
    opened = [0]
    running: set[asyncio.Task] = set()

    async def one(scheduled: float, request: bytes) -> None:
        results["lag"].append(time.perf_counter() - scheduled)
        while idle and time.perf_counter() - idle[0][2] > STALE_CONNECTION_SECONDS:
            idle.pop(0)[1].close()  # the server may be closing it: a client would not reuse it
            opened[0] -= 1
        if idle:
            reader, writer, _ = idle.pop()
        elif opened[0] >= max_connections:
            results["errors"].append(f"client: all {max_connections} connections busy")
            return
        else:
            opened[0] += 1
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError as exc:
                opened[0] -= 1
                results["errors"].append(f"{type(exc).__name__}: {exc}")
                return
        try:
            status, body = await asyncio.wait_for(_exchange(reader, writer, request), 60)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            results["errors"].append(f"{type(exc).__name__}: {exc}")
            writer.close()
            opened[0] -= 1
            return
        if 200 <= status < 300:
            results["search"].append(time.perf_counter() - scheduled)
        else:
            results["errors"].append(f"HTTP {status}: {body[:120]!r}")
        idle.append((reader, writer, time.perf_counter()))

    started = time.perf_counter()
    offset = 0.0
    while True:
        offset += rng.expovariate(rate) if arrivals == "poisson" else 1.0 / rate
        if offset >= seconds:
            break
        scheduled = started + offset
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one(scheduled, searches[rng.randrange(len(searches))]))
        running.add(task)
        task.add_done_callback(running.discard)
    if running:
        await asyncio.gather(*running)
    results["wall"] = [time.perf_counter() - started]
    for _, writer, _ in idle:
        writer.close()
    return results


def batch_counts(server: Server) -> tuple[float, float]:
    """(index searches, queries in them) of single searches so far, from the server's
    /metrics (dpq_search_batch_queries); (0, 0) for a server without it."""
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    values = {"count": 0.0, "sum": 0.0}
    for line in text.splitlines():
        for name in values:
            if line.startswith(f"dpq_search_batch_queries_{name} "):
                values[name] = float(line.split()[1])
    return values["count"], values["sum"]


def idle_add_latency(server: Server, adds: list[bytes], count: int = 30) -> tuple[float, float]:
    """(p50, max) ms of ``count`` adds sent one at a time to an otherwise idle server: the
    cost of a durable add (encode, index add, journal append + fsync) without queueing."""

    async def run() -> list[float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        took = []
        for i in range(count):
            started = time.perf_counter()
            status, body = await _exchange(reader, writer, adds[i % len(adds)])
            if status != 201:
                raise RuntimeError(f"an add failed: HTTP {status} {body[:200]!r}")
            took.append((time.perf_counter() - started) * 1000)
        writer.close()
        return took

    took = asyncio.run(run())
    return float(np.median(took)), float(max(took))


def _latency_row(name: str, server: Server, results: dict, wall: float, before: dict) -> dict:
    """The fields every phase reports: percentiles of the search latencies (ms), errors, CPU
    seconds of server and client since ``before``, and the mean batch of the service."""
    searches = np.array(results["search"]) * 1000
    count, total = batch_counts(server)
    searched = count - before["batches"][0]
    return {
        "phase": name,
        "p50": float(np.percentile(searches, 50)) if len(searches) else float("nan"),
        "p95": float(np.percentile(searches, 95)) if len(searches) else float("nan"),
        "p99": float(np.percentile(searches, 99)) if len(searches) else float("nan"),
        "errors": len(results["errors"]),
        "cpu_server": server.cpu_seconds() - before["cpu_server"],
        "cpu_client": time.process_time() - before["cpu_client"],
        "wall": wall,
        "mean_batch": (total - before["batches"][1]) / searched if searched else float("nan"),
        "first_errors": results["errors"][:3],
    }


def _before(server: Server) -> dict:
    return {
        "cpu_server": server.cpu_seconds(),
        "cpu_client": time.process_time(),
        "batches": batch_counts(server),
    }


def _say(row: dict, extra: str = "") -> None:
    print(
        f"  {row['phase']}: {row['requests_per_s']:,.0f} req/s{extra}, p50/p95/p99 "
        f"{row['p50']:.1f}/{row['p95']:.1f}/{row['p99']:.1f} ms, {row['errors']} errors, "
        f"mean batch {row['mean_batch']:.1f}; CPU s server {row['cpu_server']:.0f}, client "
        f"{row['cpu_client']:.0f} of {row['wall'] * (os.cpu_count() or 1):.0f}; load average "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )
    for error in row["first_errors"]:
        print(f"    error: {error}", flush=True)


def run_phase(
    name: str, server: Server, searches, adds, add_fraction, args, queries_per_request: int = 1
) -> dict:
    """One closed-loop phase; searches/s counts queries (``queries_per_request`` per search
    request: a batch), latencies are per request."""
    before = _before(server)
    results = asyncio.run(
        _load(server.port, searches, adds, add_fraction, args.clients, args.seconds, args.seed)
    )
    wall = results["wall"][0]
    adds = np.array(results["add"]) * 1000
    row = _latency_row(name, server, results, wall, before)
    found = len(results["search"])
    row.update(
        requests_per_s=(found + len(adds) + len(results["errors"])) / wall,
        searches_per_s=found * queries_per_request / wall,
        adds=len(adds),
        add_p50=float(np.percentile(adds, 50)) if len(adds) else float("nan"),
        add_p99=float(np.percentile(adds, 99)) if len(adds) else float("nan"),
        offered=None,
    )
    _say(row, f", {row['adds']} adds")
    return row


def run_open_phase(name: str, server: Server, searches, rate: float, args) -> dict:
    """One open-loop phase at ``rate`` requests per second."""
    before = _before(server)
    results = asyncio.run(
        _open_loop(
            server.port,
            searches,
            rate,
            args.seconds,
            args.seed,
            args.arrivals,
            args.max_connections,
        )
    )
    wall = results["wall"][0]
    row = _latency_row(name, server, results, wall, before)
    lag = np.array(results["lag"]) * 1000
    found = len(results["search"])
    row.update(
        requests_per_s=(found + len(results["errors"])) / wall,
        searches_per_s=found / wall,
        adds=0,
        add_p50=float("nan"),
        add_p99=float("nan"),
        offered=rate,
        lag_p99=float(np.percentile(lag, 99)) if len(lag) else float("nan"),
    )
    _say(row, f" (offered {rate:,.0f}, client lag p99 {row['lag_p99']:.1f} ms)")
    return row


def batching_modes(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(mode, extra `dpq serve` flags) of each micro-batching mode to run, "off" first."""
    on = []
    if args.batch_max is not None:
        on += ["--batch-max", str(args.batch_max)]
    if args.batch_wait_ms is not None:
        on += ["--batch-wait-ms", str(args.batch_wait_ms)]
    if args.batch_concurrency is not None:
        on += ["--batch-concurrency", str(args.batch_concurrency)]
    modes = {"off": ["--batch-max", "1"], "on": on}
    chosen = ["off", "on"] if args.batching == "both" else [args.batching]
    return [(mode, modes[mode]) for mode in chosen]


def open_loop_fractions(args: argparse.Namespace) -> list[float]:
    return [float(part) for part in args.open_loop.split(",") if part.strip()]


def run_mode(
    mode: str, server: Server, searches, adds, args, capacity_off: float | None
) -> list[dict]:
    """Closed loop (the capacity), open loop at fractions of it (or of ``capacity_off``
    with --open-loop-of off), then the mix with adds; every row tagged with ``mode``."""
    idle = idle_add_latency(server, adds)
    print(f"  idle server, one add at a time: p50 {idle[0]:.1f} ms, max {idle[1]:.1f} ms")
    closed = run_phase("closed loop", server, searches, adds, 0.0, args)
    rows = [closed]
    base = capacity_off if args.open_loop_of == "off" and capacity_off else None
    capacity = base or closed["requests_per_s"]
    for fraction in open_loop_fractions(args):
        name = f"open loop {fraction:.0%}"
        rows.append(run_open_phase(name, server, searches, fraction * capacity, args))
    rows.append(
        run_phase(
            f"+ {args.add_fraction:.0%} adds", server, searches, adds, args.add_fraction, args
        )
    )
    for row in rows:
        row.update(mode=mode, idle_add=idle)
    return rows


# ---------------------------------------------------------------- scenarios


def serve_modes(
    args: argparse.Namespace,
    original: Path,
    server_flags: list[str],
    searches: list[bytes],
    adds: list[bytes],
    client_batches: list[bytes] | None = None,
) -> list[dict]:
    """Every batching mode in turn, each on a fresh copy of ``original`` (the adds of one
    mode never reach the next); the client-batch phase (``/search/batch``) in the first
    mode only, since the service's micro-batching does not touch it."""
    rows: list[dict] = []
    capacity_off = None
    for mode, flags in batching_modes(args):
        path = original.with_name(f"{mode}-{original.name}")
        shutil.copy(original, path)
        print(f" batching {mode} ({' '.join(flags) or 'the service defaults'}):", flush=True)
        server = Server(str(path), *server_flags, *flags)
        try:
            mode_rows = run_mode(mode, server, searches, adds, args, capacity_off)
            if client_batches and not rows:
                name = f"client batches of {args.batch}"
                row = run_phase(name, server, client_batches, adds, 0.0, args, args.batch)
                row.update(mode=mode, idle_add=mode_rows[0]["idle_add"])
                mode_rows.insert(1, row)
        finally:
            stop_seconds = server.stop()
        print(f"  shutdown with compaction: {stop_seconds:.1f} s", flush=True)
        if mode == "off":
            capacity_off = mode_rows[0]["requests_per_s"]
        rows += mode_rows
        for leftover in path.parent.glob(f"{path.name}*"):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
    return rows


def scenario_vectors(args: argparse.Namespace) -> list[dict]:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dpq-serve-load-"))
    path = workdir / f"synthetic-{args.n}.index.npz"
    started = time.perf_counter()
    index = synthetic_index(args.n, args.dim, args.seed, args.partition_levels)
    queries = vector_queries(index, args.queries, args.seed)
    save_started = time.perf_counter()
    index.save(path)
    save_seconds = time.perf_counter() - save_started
    print(
        f"vectors: {index.ntotal:,} items, D={index.dim}, built in "
        f"{save_started - started:.1f} s; one atomic index save {save_seconds * 1000:.0f} ms",
        flush=True,
    )
    levels = None if args.bits is None else args.bits // 8
    probe = {} if args.nprobe is None else {"nprobe": args.nprobe}
    index.search(queries[:1], args.k, num_levels=levels, **probe)
    rate = in_process_rate(
        lambda i: index.search(queries[i : i + 1], args.k, num_levels=levels, **probe),
        len(queries),
        args.baseline_seconds,
    )
    print(f"  in-process DPQIndex.search, one query per call: {rate:,.0f} queries/s", flush=True)
    per_call = min(64, len(queries))
    starts = len(queries) - per_call + 1
    many = per_call * in_process_rate(
        lambda i: index.search(
            queries[i % starts : i % starts + per_call], args.k, num_levels=levels, **probe
        ),
        len(queries),
        args.baseline_seconds,
    )
    print(f"  in-process, {per_call} queries per call: {many:,.0f} queries/s", flush=True)
    if probe:
        _, probed = index.search(queries, args.k, num_levels=levels, **probe)
        _, exhaustive = index.search(queries, args.k, num_levels=levels)
        found = np.mean(
            [len(np.intersect1d(a, b)) / args.k for a, b in zip(probed, exhaustive, strict=True)]
        )
        print(f"  nprobe={args.nprobe}: recall@{args.k} of the exhaustive scan {found:.4f}")
    extra = ({} if args.bits is None else {"bits": args.bits}) | probe
    searches = [
        json_request("/search", {"vector": q.tolist(), "k": args.k, **extra}) for q in queries
    ]
    adds = [json_request("/items", {"vectors": [q.tolist()]}) for q in queries]
    batches = []  # the same queries, --batch per request
    for start in range(0, len(queries) - args.batch + 1, args.batch) if args.batch > 1 else []:
        chosen = [{"vector": q.tolist()} for q in queries[start : start + args.batch]]
        batches.append(json_request("/search/batch", {"queries": chosen, "k": args.k, **extra}))
    flags = ["--threads", str(args.threads), "--allow-open-writes"]
    rows = serve_modes(args, path, flags, searches, adds, batches)
    for row in rows:
        row.update(scenario="vectors", in_process=rate, save_ms=save_seconds * 1000, items=args.n)
    path.unlink(missing_ok=True)
    return rows


def scenario_images(args: argparse.Namespace) -> list[dict]:
    from dpq.index import DPQIndex
    from dpq.model.network import DPQModel
    from dpq.serve.images import decode_upload, model_input

    missing = [
        f"--{name}" for name in ("index", "model", "images", "split") if not getattr(args, name)
    ]
    if missing:
        raise SystemExit(f"the images scenario needs {', '.join(missing)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dpq-serve-load-"))
    path = workdir / "images.index.npz"
    path.write_bytes(Path(args.index).read_bytes())  # the adds must not touch the original
    index = DPQIndex.load(path)
    model = DPQModel.from_checkpoint(args.model)
    uploads, size = image_queries(args, args.queries)
    started = time.perf_counter()
    index.save(workdir / "copy.index.npz")
    save_seconds = time.perf_counter() - started
    (workdir / "copy.index.npz").unlink()
    print(
        f"images: {index.ntotal:,} items, {len(uploads)} query JPEGs; one atomic index save "
        f"{save_seconds * 1000:.0f} ms",
        flush=True,
    )
    levels = None if args.bits is None else args.bits // 8

    def one_query(i: int) -> None:
        pixels = model_input(decode_upload(uploads[i], "q.jpg"), size)
        index.search(model.extract_features(pixels[None]), args.k, num_levels=levels)

    import torch

    rates = {}
    default_threads = torch.get_num_threads()
    for threads in sorted({1, default_threads}):  # small batches can run better on one thread
        torch.set_num_threads(threads)
        rates[threads] = in_process_rate(one_query, len(uploads), args.baseline_seconds)
    torch.set_num_threads(default_threads)
    rate = max(rates.values())
    shown = ", ".join(f"{r:,.1f} with {t} torch thread(s)" for t, r in rates.items())
    print(f"  in-process decode + model + DPQIndex.search, one per call: {shown}; best {rate:,.1f}")
    extra = {"k": str(args.k)} if args.bits is None else {"k": str(args.k), "bits": str(args.bits)}
    searches = [multipart_request("/search", "file", data, extra) for data in uploads]
    adds = [multipart_request("/items", "files", data, {}) for data in uploads]
    model_threads = (
        [] if args.model_threads is None else ["--model-threads", str(args.model_threads)]
    )
    flags = ["--model", args.model, "--images", args.images, "--threads", str(args.threads)]
    flags += ["--allow-open-writes", *model_threads]
    flags += ["--engine", args.engine, "--engine-precision", args.engine_precision]
    flags += [] if args.onnx is None else ["--onnx", args.onnx]
    rows = serve_modes(args, path, flags, searches, adds)
    for row in rows:
        row.update(
            scenario="images", in_process=rate, save_ms=save_seconds * 1000, items=index.ntotal
        )
    path.unlink(missing_ok=True)
    return rows


def cpu_flags() -> tuple[str, list[str]]:
    """(model name, flags) of this machine's CPU from `lscpu` (/proc/cpuinfo without it)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        return fields.get("Model name", "unknown").strip(), fields.get("Flags", "").split()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown", []
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return fields.get("model name\t", "unknown").strip(), fields.get("flags\t\t", "").split()


def cpu_facts() -> str:
    """The CPU's model name and the vector flags that matter to the scan."""
    name, flags = cpu_flags()
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni")
    return f"{name}; flags {' '.join(flag for flag in wanted if flag in flags)}"


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print()
    print(
        f"{args.clients} clients x {args.seconds:g} s per phase, open loop "
        f"{args.arrivals} at {args.open_loop or 'none'} of the "
        f"{'own' if args.open_loop_of == 'own' else 'batching-off'} capacity, k={args.k}, "
        f"bits={args.bits or 'all'}, partition levels {args.partition_levels}, nprobe "
        f"{args.nprobe or 'all cells'}, server threads {args.threads}, model threads "
        f"{args.model_threads or 'torch default'}, engine {args.engine} {args.engine_precision} "
        f"(images), {os.cpu_count()} CPUs ({cpu_facts()})"
    )
    print(
        "| scenario | batching | phase | items | offered req/s | requests/s | searches/s "
        "| x in-process | mean batch | p50 ms | p95 ms | p99 ms | errors | adds "
        "| add p50 / p99 ms | idle add p50 ms | atomic save ms | in-process q/s |"
    )
    print(
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        add = f"{r['add_p50']:.1f} / {r['add_p99']:.1f}" if r["adds"] else "-"
        offered = "-" if r["offered"] is None else f"{r['offered']:,.0f}"
        print(
            f"| {r['scenario']} | {r['mode']} | {r['phase']} | {r['items']:,} | {offered} | "
            f"{r['requests_per_s']:,.0f} | {r['searches_per_s']:,.0f} | "
            f"{r['searches_per_s'] / r['in_process']:.2f} | {r['mean_batch']:.1f} | "
            f"{r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | {r['errors']} | {r['adds']} | "
            f"{add} | {r['idle_add'][0]:.1f} | {r['save_ms']:.0f} | {r['in_process']:,.0f} |"
        )


def print_ratios(rows: list[dict]) -> None:
    """Micro-batching on against off, phase by phase (off is the baseline: ratios > 1 mean
    more requests/s, or longer latencies)."""
    off = {(r["scenario"], r["phase"]): r for r in rows if r["mode"] == "off"}
    pairs = [(off[(r["scenario"], r["phase"])], r) for r in rows
             if r["mode"] == "on" and (r["scenario"], r["phase"]) in off]  # fmt: skip
    if not pairs:
        return
    print()
    print("batching on / off, same run, same phase (open loop: own capacities unless "
          "--open-loop-of off):")  # fmt: skip
    print("| scenario | phase | requests/s on/off | p50 on/off | p95 on/off | p99 on/off "
          "| p99 ms off -> on | errors off, on |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for base, new in pairs:
        print(
            f"| {new['scenario']} | {new['phase']} | "
            f"{new['requests_per_s'] / base['requests_per_s']:.2f} | "
            f"{new['p50'] / base['p50']:.2f} | {new['p95'] / base['p95']:.2f} | "
            f"{new['p99'] / base['p99']:.2f} | {base['p99']:.1f} -> {new['p99']:.1f} | "
            f"{base['errors']}, {new['errors']} |"
        )


def main() -> None:
    args = _parse_args()
    name, flags = cpu_flags()
    print(f"CPU (lscpu): {name}, {os.cpu_count()} CPUs; flags: {' '.join(flags)}", flush=True)
    for var in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    rows = []
    if args.scenario in ("images", "all"):
        rows += scenario_images(args)
    if args.scenario in ("vectors", "all"):
        rows += scenario_vectors(args)
    print_table(rows, args)
    print_ratios(rows)


if __name__ == "__main__":
    main()
