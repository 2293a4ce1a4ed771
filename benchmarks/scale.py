"""The partitioned DPQIndex at scale (issue 15); never run by CI.

Three parts, each printing a markdown table; every number comes from this run, with the
same thread count for DPQ (numba) and faiss (OpenMP):

synthetic  --n items (default 10,000,000), D = 300, L = 4, K = 256. Features: a Gaussian
           mixture of 1,000 clusters whose sizes follow a Zipf law (weight of the r-th
           cluster ~ r^-0.5: the largest holds 32x the smallest), centres ~ N(0, I), within-
           cluster covariance a randomly rotated power-law spectrum (eigenvalues ~ i^-1)
           whose total equals the between-cluster variance (signal-to-noise 1), so
           clusters overlap and the cells of the first codes are uneven. Codebooks: a
           greedy residual quantizer (faiss ResidualQuantizer, beam 1) trained on 131,072
           held-out draws, standing in for a trained model; the database is encoded with
           dpq's greedy_residual_encode. Generated chunk by chunk (never all in memory).
           Rows: DPQ exhaustive scan; DPQ partition_levels 1 and 2 for nprobe in
           {1, 4, 16, 64, 256} (and 8, 32, 128); faiss IVF-PQ "OPQ8_296,IVF4096,PQ8" (8 bytes
           per item like DPQ's 4 code bytes + 4 norm bytes; 4096 lists = 1.3 sqrt(N), the
           most whose training and assignment of 10M vectors fit this benchmark's time on two
           cores; trained by faiss on 262,144 held-out draws, OPQ with 20 iterations on
           65,536 of them) for the same nprobe; the DPQ codes exported to faiss IVF with on-disk lists,
           loaded memory-mapped; faiss HNSW32 over the float features of the first --hnsw-n
           items (10M floats would take 12 GB), with DPQ on that subset beside it.
           Recall@100 against the exhaustive DPQ top-100 (what partitioning costs) and
           against the exact top-100 of the float features (what a user sees; computed in
           chunks with faiss IndexFlatL2 and ResultHeap).
codes      --codes-n synthetic codes (default 100,000,000; first two codes drawn from the
           synthetic part's cells, so cells are as uneven, the other two uniform; run alone,
           the codebooks are trained again and 2^20 items encoded for their cells): memory
           per item, grouping time,
           queries/s of the exhaustive and partitioned scans; then the file path: save,
           memory-mapped load with and without the checksum, a merge of two copies into
           one file of 2 x --codes-n items, each in a child process whose peak memory is
           reported.
cifar10    the CIFAR-10 database encoded with a trained model (--model, --split, --images):
           the same rows plus mAP@1000, faiss IVF-PQ with 256 lists (as many as DPQ's K
           cells) and HNSW over the float features.

    flock /tmp/dpq-heavy.lock python benchmarks/scale.py                  # everything
    python benchmarks/scale.py --parts synthetic --n 200000 --codes-n 0   # a quick check

Timings are the best of --repeats runs. queries/s is wall clock over all queries at once;
CPU ms/query (time.process_time of this process) stays meaningful on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

THREADS_DEFAULT = 2
NPROBES = (1, 4, 8, 16, 32, 64, 128, 256)  # the 1, 4, 16, 64, 256 and between
# K^2 = 65,536 cells are probed further (like faiss IVF65536's usual nprobe range)
NPROBES_BY_LEVELS = {1: NPROBES, 2: (*NPROBES, 512, 1024)}
K_RECALL = 100


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="synthetic,codes,cifar10", help="comma-separated")
    parser.add_argument("--n", type=int, default=10_000_000, help="synthetic items")
    parser.add_argument("--nq", type=int, default=1000, help="queries")
    parser.add_argument("--hnsw-n", type=int, default=1_000_000, help="items HNSW indexes")
    parser.add_argument("--codes-n", type=int, default=100_000_000, help="codes-only items")
    parser.add_argument("--threads", type=int, default=THREADS_DEFAULT)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nlist", type=int, default=4096, help="faiss IVF-PQ lists (synthetic)")
    parser.add_argument(
        "--work-dir", type=Path, default=Path("/tmp/dpq-scale"), help="files written here"
    )
    parser.add_argument("--model", type=Path, default=Path("/work/scratch/base-repro2/model"))
    parser.add_argument("--split", type=Path, default=Path("/work/scratch/base-repro2/split.json"))
    parser.add_argument(
        "--images", type=Path, default=Path("/work/shared/data/cifar10/cifar10-jpeg.zip")
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a file operation, as JSON
    return parser.parse_args(argv)


def _setup_threads(threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(threads)


def _peak_rss_gib() -> float:
    """Peak resident memory of this process image (VmHWM: unlike ru_maxrss it does not
    carry over the parent's peak into a child started with fork + exec)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _rss_gib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


# ------------------------------------------------------------------ synthetic features


class ClusteredFeatures:
    """The synthetic collection (see the module docstring); chunk i is reproducible."""

    def __init__(self, dim: int, seed: int, clusters: int = 1000, zipf: float = 0.5) -> None:
        import numpy as np

        rng = np.random.default_rng([seed, 1])
        self.dim, self.seed = dim, seed
        self.centers = rng.standard_normal((clusters, dim), dtype=np.float32)
        weights = (np.arange(clusters) + 1.0) ** -zipf
        self.weights = weights / weights.sum()
        spectrum = 1.0 / (np.arange(dim) + 1.0)
        spectrum *= dim / spectrum.sum()  # total within-cluster variance = between (= dim)
        rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        self.basis = (np.sqrt(spectrum)[:, None] * rotation.T).astype(np.float32)

    def draw(self, stream: int, count: int):
        """float32 (count, D) draws from stream number ``stream`` (seeded separately)."""
        import numpy as np

        rng = np.random.default_rng([self.seed, 2, stream])
        cluster = rng.choice(len(self.weights), size=count, p=self.weights)
        noise = rng.standard_normal((count, self.dim), dtype=np.float32)
        return self.centers[cluster] + noise @ self.basis


# streams: database chunks 0.., held-out sets far away
_QUERY_STREAM, _RQ_TRAIN_STREAM, _PQ_TRAIN_STREAM = 10**6, 10**6 + 1, 10**6 + 2
_CHUNK = 1 << 20


# ------------------------------------------------------------------ measurement helpers


def _time(run, repeats: int):
    """(result, best wall seconds, best CPU seconds) of run()."""
    best_wall = best_cpu = float("inf")
    result = None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        result = run()
        best_wall = min(best_wall, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return result, best_wall, best_cpu


def _recall(ids, reference) -> float:
    """Mean over queries of |ids ∩ reference| / width of reference (padding -1 ignored)."""
    import numpy as np

    width = reference.shape[1]
    hits = [len(np.intersect1d(a[a >= 0], b[b >= 0])) for a, b in zip(ids, reference, strict=True)]
    return float(np.mean(hits) / width)


class Table:
    """Rows of one benchmark table, printed as markdown with ratios against references."""

    def __init__(self, title: str, nq: int) -> None:
        self.title, self.nq, self.rows = title, nq, []

    def add(self, method, setting, bytes_per_item, build_s, wall, cpu, ids, refs, **extra):
        row = {
            "method": method,
            "setting": setting,
            "bytes": bytes_per_item,
            "build_s": build_s,
            "qps": self.nq / wall,
            "cpu_ms": 1e3 * cpu / self.nq,
            **{f"recall_{name}": _recall(ids, ref) for name, ref in refs.items()},
            **extra,
        }
        self.rows.append(row)
        print(
            f"  {method} {setting}: {row['qps']:,.0f} q/s, "
            + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith(("recall", "map"))),
            flush=True,
        )
        return row

    def print(self, baseline_qps: float, columns: list[tuple[str, str]], notes: list[str]) -> None:
        print(f"\n### {self.title}\n")
        head = ["method", "setting", "bytes/item (+8 id)", "build s", "queries/s", "x exhaustive"]
        head += ["CPU ms/query"] + [label for _, label in columns]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * 2 + "---:|" * (len(head) - 2))
        for row in self.rows:
            cells = [
                row["method"],
                row["setting"],
                str(row["bytes"]),
                "-" if row["build_s"] is None else f"{row['build_s']:.1f}",
                f"{row['qps']:,.0f}",
                f"{row['qps'] / baseline_qps:.1f}",
                f"{row['cpu_ms']:.3f}",
            ] + [f"{row[key]:.4f}" if key in row else "-" for key, _ in columns]
            print("| " + " | ".join(cells) + " |")
        for note in notes:
            print(f"\n{note}")
        print(flush=True)


def _interpolated_qps(rows, recall_key: str, target: float):
    """qps of a method's nprobe curve at a recall (linear in log qps); None if out of range."""
    import numpy as np

    points = sorted((row[recall_key], row["qps"]) for row in rows)
    recalls = np.array([p[0] for p in points])
    if not len(points) or target > recalls.max():
        return None
    if target <= recalls.min():
        return max(p[1] for p in points)
    return float(np.exp(np.interp(target, recalls, np.log([p[1] for p in points]))))


def _target_lines(table: Table, dpq_prefix: str, ivfpq_name: str) -> list[str]:
    """The issue's targets, checked on the measured rows."""
    exhaustive = next(r for r in table.rows if r["setting"] == "exhaustive")
    lines = []
    ok = [
        r
        for r in table.rows
        if r["method"].startswith(dpq_prefix)
        and r["setting"] != "exhaustive"
        and r["recall_dpq"] >= 0.95
        and r["qps"] >= 10 * exhaustive["qps"]
    ]
    best = max(ok, key=lambda r: r["qps"], default=None)
    lines.append(
        "Target recall@100 >= 0.95 of the exhaustive DPQ top-100 at >= 10x its queries/s: "
        + (
            f"met by {best['method']} {best['setting']} (recall {best['recall_dpq']:.3f}, "
            f"{best['qps'] / exhaustive['qps']:.1f}x)."
            if best
            else "NOT met by any measured setting."
        )
    )
    ivf_rows = [r for r in table.rows if r["method"] == ivfpq_name]
    parts = []
    for r in table.rows:
        if not r["method"].startswith(dpq_prefix) or r["setting"] == "exhaustive":
            continue
        faiss_qps = _interpolated_qps(ivf_rows, "recall_float", r["recall_float"])
        ratio = "above faiss's best recall" if faiss_qps is None else f"{r['qps'] / faiss_qps:.2f}x"
        parts.append(
            f"{r['method']} {r['setting']} (float recall {r['recall_float']:.3f}): {ratio}"
        )
    lines.append(
        "queries/s against faiss IVF-PQ at the same float recall (its nprobe curve "
        "interpolated): " + "; ".join(parts) + "."
    )
    return lines


# ------------------------------------------------------------------ part 1: synthetic


def run_synthetic(args, shared: dict) -> None:
    import faiss
    import numpy as np

    from dpq.index import DPQIndex, load_faiss_index, write_faiss_ivf_ondisk

    n, nq, d = args.n, args.nq, 300
    gen = ClusteredFeatures(d, args.seed)
    queries = gen.draw(_QUERY_STREAM, nq)
    print(f"\n## synthetic: {n:,} items, D={d}, L=4, K=256, {nq} queries", flush=True)

    t0 = time.perf_counter()
    rq = faiss.ResidualQuantizer(d, 4, 8)
    rq.train_type = faiss.ResidualQuantizer.Train_default
    rq.max_beam_size = 1
    rq.train(gen.draw(_RQ_TRAIN_STREAM, 131_072))
    codebooks = faiss.vector_to_array(rq.codebooks).reshape(4, 256, d)
    rq_seconds = time.perf_counter() - t0
    print(f"  residual quantizer trained in {rq_seconds:.0f} s", flush=True)

    t0 = time.perf_counter()
    ivfpq = faiss.index_factory(d, f"OPQ8_296,IVF{args.nlist},PQ8")
    faiss.extract_index_ivf(ivfpq).cp.niter = 10  # k-means iterations for the lists
    faiss.downcast_VectorTransform(ivfpq.chain.at(0)).niter = 20  # OPQ (default 50)
    ivfpq.train(gen.draw(_PQ_TRAIN_STREAM, 64 * args.nlist))
    ivfpq_train = time.perf_counter() - t0
    print(f"  faiss IVF-PQ trained in {ivfpq_train:.0f} s", flush=True)

    flat = DPQIndex(codebooks)
    flat.reserve(n)
    heap = faiss.ResultHeap(nq, K_RECALL)
    hnsw_n = min(args.hnsw_n, n)
    hnsw = faiss.IndexHNSWFlat(d, 32)
    hnsw.hnsw.efConstruction = 40
    sub_heap = faiss.ResultHeap(nq, K_RECALL)
    seconds = {"generate": 0.0, "encode": 0.0, "ivfpq_add": 0.0, "truth": 0.0, "hnsw": 0.0}
    rss_before = _rss_gib()
    for start in range(0, n, _CHUNK):
        count = min(_CHUNK, n - start)
        t0 = time.perf_counter()
        x = gen.draw(start // _CHUNK, count)
        seconds["generate"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        flat.add_features(x)
        seconds["encode"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        ivfpq.add(x)
        seconds["ivfpq_add"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        dist, ids = faiss.knn(queries, x, K_RECALL)  # exact L2, blocked BLAS
        heap.add_result(dist, ids + start)
        if start < hnsw_n:
            part = min(count, hnsw_n - start)
            if part < count:
                dist, ids = faiss.knn(queries, x[:part], K_RECALL)
            sub_heap.add_result(dist, ids + start)
        seconds["truth"] += time.perf_counter() - t0
        if start < hnsw_n:
            t0 = time.perf_counter()
            hnsw.add(x[: hnsw_n - start])
            seconds["hnsw"] += time.perf_counter() - t0
        del x
        print(
            f"  {start + count:,} items: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
            + f", RSS {_rss_gib():.1f} GiB",
            flush=True,
        )
    heap.finalize()
    sub_heap.finalize()
    truth, sub_truth = heap.I.copy(), sub_heap.I.copy()
    dpq_mib = (_rss_gib() - rss_before) * 1024
    print(f"  peak RSS so far {_peak_rss_gib():.1f} GiB", flush=True)

    refs: dict = {"float": truth}
    table = Table(f"synthetic, {n:,} items (D=300, L=4, K=256), {nq} queries, k=100", nq)
    flat.search(queries[:2], K_RECALL)  # load the compiled kernels
    exhaustive, wall, cpu = _time(lambda: flat.search(queries, K_RECALL), 1)
    refs["dpq"] = exhaustive[1]
    base = table.add(
        "DPQ",
        "exhaustive",
        flat.bytes_per_item(),
        rq_seconds + seconds["encode"],
        wall,
        cpu,
        exhaustive[1],
        refs,
    )
    shared["synthetic_cells"] = flat.codes[:, :2].copy()
    shared["queries"] = queries
    shared["codebooks"] = codebooks
    for levels in (1, 2):
        t0 = time.perf_counter()
        part = DPQIndex(codebooks, partition_levels=levels)
        part.add(flat.codes)
        part.search(queries[:1], 1, nprobe=1)  # groups the cells
        build = time.perf_counter() - t0 + rq_seconds + seconds["encode"]
        sizes = np.diff(part.cell_offsets)
        print(
            f"  p={levels}: {np.count_nonzero(sizes):,} non-empty cells of {len(sizes):,}; "
            f"items per non-empty cell: median {np.median(sizes[sizes > 0]):.0f}, max "
            f"{sizes.max():,}, mean seen by a query {np.sum(sizes.astype(float) ** 2) / n:,.0f}",
            flush=True,
        )
        for nprobe in NPROBES_BY_LEVELS[levels]:
            part.search(queries[:8], K_RECALL, nprobe=nprobe)  # compile
            result, wall, cpu = _time(
                lambda part=part, nprobe=nprobe: part.search(queries, K_RECALL, nprobe=nprobe),
                args.repeats,
            )
            table.add(
                f"DPQ p={levels}",
                f"nprobe={nprobe}",
                part.bytes_per_item(),
                build,
                wall,
                cpu,
                result[1],
                refs,
            )
        if levels == 1:
            p1 = part
        else:
            del part
    ivf = faiss.extract_index_ivf(ivfpq)
    ivf_bytes = ivf.code_size
    for nprobe in NPROBES:
        ivf.nprobe = nprobe
        ivfpq.search(queries[:8], K_RECALL)
        result, wall, cpu = _time(lambda: ivfpq.search(queries, K_RECALL), args.repeats)
        table.add(
            "faiss IVF-PQ",
            f"OPQ8_296,IVF{args.nlist},PQ8 nprobe={nprobe}",
            ivf_bytes,
            ivfpq_train + seconds["ivfpq_add"],
            wall,
            cpu,
            result[1],
            refs,
        )
    ivfpq = ivf = None  # free its memory

    # the DPQ codes as faiss IVF with on-disk lists, loaded memory-mapped
    args.work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = write_faiss_ivf_ondisk(p1, args.work_dir / "synthetic-p1.faiss")
    export = time.perf_counter() - t0
    ondisk = load_faiss_index(path)
    ondisk_ivf = faiss.extract_index_ivf(ondisk)
    for nprobe in (1, 16, 64):
        ondisk_ivf.nprobe = nprobe
        ondisk.search(queries[:8], K_RECALL)
        result, wall, cpu = _time(lambda: ondisk.search(queries, K_RECALL), args.repeats)
        same = p1.search(queries, K_RECALL, nprobe=nprobe)[1]
        table.add(
            "faiss IVF-RQ (DPQ codes, on disk, mmap)",
            f"nprobe={nprobe}",
            ondisk_ivf.code_size,
            export,
            wall,
            cpu,
            result[1],
            refs,
            same_as_dpq=_recall(result[1], same),
        )
    ondisk = ondisk_ivf = p1 = None

    # HNSW over floats on the first hnsw_n items, DPQ on the same subset
    sub_refs = {"float": sub_truth}
    sub = Table(f"synthetic, first {hnsw_n:,} items: HNSW over float features beside DPQ", nq)
    sub_flat = DPQIndex(codebooks)
    sub_flat.add(flat.codes[:hnsw_n])
    sub_flat.search(queries[:2], K_RECALL)
    result, wall, cpu = _time(lambda: sub_flat.search(queries, K_RECALL), args.repeats)
    sub_refs["dpq"] = result[1]
    sub_base = sub.add("DPQ", "exhaustive", 8, None, wall, cpu, result[1], sub_refs)
    sub_part = DPQIndex(codebooks, partition_levels=2)
    sub_part.add(flat.codes[:hnsw_n])
    for nprobe in NPROBES_BY_LEVELS[2]:
        sub_part.search(queries[:8], K_RECALL, nprobe=nprobe)
        result, wall, cpu = _time(
            lambda nprobe=nprobe: sub_part.search(queries, K_RECALL, nprobe=nprobe), args.repeats
        )
        sub.add("DPQ p=2", f"nprobe={nprobe}", 8, None, wall, cpu, result[1], sub_refs)
    graph_bytes = faiss.vector_to_array(hnsw.hnsw.neighbors).size * 4 / hnsw_n
    for ef in (16, 64, 256):
        hnsw.hnsw.efSearch = ef
        result, wall, cpu = _time(lambda: hnsw.search(queries, K_RECALL), args.repeats)
        sub.add(
            "faiss HNSW32 (float)",
            f"efSearch={ef}",
            f"{4 * d + graph_bytes:.0f}",
            seconds["hnsw"],
            wall,
            cpu,
            result[1],
            sub_refs,
        )
    columns = [
        ("recall_dpq", "recall@100 vs DPQ exhaustive"),
        ("recall_float", "recall@100 vs float"),
    ]
    notes = [
        f"Build s: DPQ = codebook training {rq_seconds:.0f} s + encoding; IVF-PQ = faiss "
        f"training {ivfpq_train:.0f} s + adding. Exact float top-100: {seconds['truth']:.0f} s "
        f"in chunks. RSS growth while building the DPQ index and IVF-PQ side by side: "
        f"{dpq_mib:,.0f} MiB; peak RSS of the run so far {_peak_rss_gib():.1f} GiB.",
        *_target_lines(table, "DPQ p=", "faiss IVF-PQ"),
        "faiss IVF-RQ rows: the p=1 DPQ codes exported with write_faiss_ivf_ondisk "
        f"({export:.0f} s) and read by load_faiss_index; 'same as DPQ' = overlap with "
        "DPQ p=1 at the same nprobe.",
    ]
    table.print(base["qps"], columns + [("same_as_dpq", "same as DPQ p=1")], notes)
    sub.print(
        sub_base["qps"],
        columns,
        [
            f"HNSW32 (efConstruction 40) built in {seconds['hnsw']:.0f} s over {hnsw_n:,} float "
            "vectors; DPQ rows use the first items' codes from the run above."
        ],
    )


# ------------------------------------------------------------------ part 2: codes only


def _anon_rss_gib() -> float:
    """Anonymous resident memory (RssAnon): what the process allocated, not the file pages
    of its memory maps, which the kernel can drop and read again."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _child(op: dict) -> dict:
    """A file operation in a fresh process (its peak memory is its own); a thread samples
    its anonymous memory every 20 ms."""
    import threading

    from dpq.index import DPQIndex, merge_index_files

    peak = {"anon": _anon_rss_gib()}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak["anon"] = max(peak["anon"], _anon_rss_gib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out: dict = {}
    t0 = time.perf_counter()
    if op["kind"] == "load":
        index = DPQIndex.load(op["path"], mmap=True, verify=op["verify"])
        out["load_s"] = time.perf_counter() - t0
        import numpy as np

        queries = np.load(op["queries"])
        index.search(queries[:2], 100, nprobe=op["nprobe"])
        t0 = time.perf_counter()
        index.search(queries, 100, nprobe=op["nprobe"])
        out["search_qps"] = len(queries) / (time.perf_counter() - t0)
        out["ntotal"] = index.ntotal
    else:
        merge_index_files(op["paths"], op["out"], renumber_ids=True)
        out["merge_s"] = time.perf_counter() - t0
    done.set()
    sampler.join()
    out["peak_rss_gib"] = _peak_rss_gib()
    out["peak_anon_gib"] = max(peak["anon"], _anon_rss_gib())
    return out


def _run_child(op: dict) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(op)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _synthetic_codes_sample(args, shared: dict, count: int = _CHUNK) -> None:
    """The synthetic part's codebooks (same training draws) and the first two codes of
    ``count`` of its items, for a codes-only run without the synthetic part."""
    import faiss
    import numpy as np

    from dpq.index import greedy_residual_encode

    gen = ClusteredFeatures(300, args.seed)
    rq = faiss.ResidualQuantizer(300, 4, 8)
    rq.train_type = faiss.ResidualQuantizer.Train_default
    rq.max_beam_size = 1
    rq.train(gen.draw(_RQ_TRAIN_STREAM, 131_072))
    shared["codebooks"] = faiss.vector_to_array(rq.codebooks).reshape(4, 256, 300)
    pieces = [  # drawn in pieces: 2^18 x 300 floats at a time
        greedy_residual_encode(gen.draw(i, 1 << 18), shared["codebooks"], num_levels=2)
        for i in range(max(1, count >> 18))
    ]
    shared["synthetic_cells"] = np.concatenate(pieces)
    shared["queries"] = gen.draw(_QUERY_STREAM, args.nq)


def run_codes(args, shared: dict) -> None:
    import numpy as np

    from dpq.index import DPQIndex

    n, nq = args.codes_n, min(args.nq, 200)
    rng = np.random.default_rng(args.seed + 7)
    if "codebooks" not in shared:  # run alone: the synthetic part's codebooks and cells
        _synthetic_codes_sample(args, shared)
    codebooks, cells = shared["codebooks"], shared["synthetic_cells"]
    queries = shared["queries"][:nq]
    print(f"\n## codes only: {n:,} items, {nq} queries", flush=True)
    table = Table(f"codes only, {n:,} synthetic items (L=4, K=256), {nq} queries, k=100", nq)
    notes = []
    rss0 = _rss_gib()
    t0 = time.perf_counter()
    index = DPQIndex(codebooks)
    index.reserve(n)
    for start in range(0, n, 1 << 22):
        count = min(1 << 22, n - start)
        chunk = rng.integers(0, 256, size=(count, 4), dtype=np.uint8)
        if cells is not None:
            chunk[:, :2] = cells[rng.integers(0, len(cells), count)]
        index.add(chunk)
    add_s = time.perf_counter() - t0
    few = queries[: max(2, nq // 20)]
    index.search(few[:1], 100)
    _, wall, cpu = _time(lambda: index.search(few, 100), 1)
    exhaustive_qps = len(few) / wall
    table.rows.append(
        {
            "method": "DPQ",
            "setting": f"exhaustive ({len(few)} queries)",
            "bytes": index.bytes_per_item(),
            "build_s": add_s,
            "qps": exhaustive_qps,
            "cpu_ms": 1e3 * cpu / len(few),
        }
    )
    notes.append(
        f"add in chunks of 4M (capacity reserved, norms computed): {add_s:.0f} s; "
        f"memory_bytes() / N = {index.memory_bytes() / n:.2f} bytes/item (codes, norm, id), "
        f"process RSS growth {(_rss_gib() - rss0) * 2**30 / n:.1f} bytes/item; "
        f"bytes_per_item() = {index.bytes_per_item()} + 8 (id)."
    )
    print("  " + notes[-1], flush=True)
    for levels in (2, 1):
        t0 = time.perf_counter()
        index.repartition(levels)
        group_s = time.perf_counter() - t0
        notes.append(
            f"p={levels}: grouping all {n:,} items {group_s:.1f} s; memory_bytes() / N = "
            f"{index.memory_bytes() / n:.2f} bytes/item; peak RSS so far "
            f"{_peak_rss_gib():.1f} GiB."
        )
        print("  " + notes[-1], flush=True)
        for nprobe in NPROBES_BY_LEVELS[levels]:
            index.search(queries[:4], 100, nprobe=nprobe)
            _, wall, cpu = _time(
                lambda nprobe=nprobe: index.search(queries, 100, nprobe=nprobe), args.repeats
            )
            table.add(f"DPQ p={levels}", f"nprobe={nprobe}", 8, add_s + group_s, wall, cpu, [], {})
        if levels == 2:  # the file path, in child processes
            args.work_dir.mkdir(parents=True, exist_ok=True)
            path = args.work_dir / "codes-p2.npz"
            t0 = time.perf_counter()
            index.save(path)
            save_s = time.perf_counter() - t0
            size_gb = path.stat().st_size / 1e9
            np.save(args.work_dir / "queries.npy", queries)
            qfile = str(args.work_dir / "queries.npy")
            load = {"kind": "load", "path": str(path), "queries": qfile, "nprobe": 16}
            loads = {verify: _run_child({**load, "verify": verify}) for verify in (True, False)}
            merged = args.work_dir / "codes-p2-merged.npz"
            merge = _run_child(
                {"kind": "merge", "paths": [str(path), str(path)], "out": str(merged)}
            )
            merged_gb = merged.stat().st_size / 1e9
            big = _run_child({**load, "path": str(merged), "verify": True})
            notes += [
                f"file ({size_gb:.2f} GB, p=2): save {save_s:.0f} s; memory-mapped load with "
                f"checksum {loads[True]['load_s']:.1f} s ({size_gb / loads[True]['load_s']:.2f} "
                f"GB/s), without {loads[False]['load_s']:.2f} s; the loading process's peak "
                f"anonymous memory {loads[True]['peak_anon_gib']:.2f} GiB (peak RSS with the "
                f"mapped file pages {loads[True]['peak_rss_gib']:.2f} GiB); nprobe=16 from the "
                f"mapped file {loads[True]['search_qps']:,.0f} q/s.",
                f"merge of two copies (renumber_ids) into {merged_gb:.2f} GB "
                f"({big['ntotal']:,} items): {merge['merge_s']:.0f} s, peak anonymous memory "
                f"{merge['peak_anon_gib']:.2f} GiB (RSS with file pages "
                f"{merge['peak_rss_gib']:.2f} GiB); its memory-mapped load with checksum "
                f"{big['load_s']:.1f} s ({merged_gb / big['load_s']:.2f} GB/s), peak anonymous "
                f"memory {big['peak_anon_gib']:.2f} GiB, nprobe=16 {big['search_qps']:,.0f} q/s.",
            ]
            print("  " + "\n  ".join(notes[-2:]), flush=True)
            merged.unlink()
            path.unlink()
    table.print(exhaustive_qps, [], notes)


# ------------------------------------------------------------------ part 3: CIFAR-10


def _cifar10_features(args):
    """(query features, query labels, database features, database labels, model)."""
    import numpy as np

    from dpq.data import load_cifar10
    from dpq.data.splits import Split
    from dpq.model.network import DPQModel

    model = DPQModel.from_checkpoint(args.model)
    cache = args.work_dir / "cifar10-features.npz"
    split = Split.load(args.split)
    if cache.is_file():
        saved = np.load(cache)
        return saved["qf"], saved["ql"], saved["df"], saved["dl"], model
    dataset = load_cifar10(args.images)
    images, labels = np.asarray(dataset.images), np.asarray(dataset.labels)
    qf = model.extract_features(images[split.query], progress=True)
    df = model.extract_features(images[split.database], progress=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cache, qf=qf, ql=labels[split.query], df=df, dl=labels[split.database])
    return qf, labels[split.query], df, labels[split.database], model


def _map_at(ids, query_labels, db_labels, r: int) -> float:
    """mAP@r (dpq.evaluate.metrics, 'retrieved' convention) with padding counted as not relevant."""
    import numpy as np

    from dpq.evaluate.metrics import map_at_r

    padded = np.where(ids < 0, len(db_labels), ids)
    labels = np.concatenate([db_labels, [-1]])  # the padding's label matches no query
    return map_at_r(padded[:, :r], query_labels, labels, r=r)


def run_cifar10(args, shared: dict) -> None:
    import faiss
    import numpy as np

    from dpq.index import DPQIndex

    t0 = time.perf_counter()
    qf, ql, df, dl, model = _cifar10_features(args)
    feature_s = time.perf_counter() - t0
    mode = model.config.model.search_mode
    books = model.codebooks()
    nq, n = len(qf), len(df)
    print(f"\n## CIFAR-10: {n:,} database items, {nq} queries, search mode {mode}", flush=True)
    metric = faiss.METRIC_INNER_PRODUCT if mode == "ip" else faiss.METRIC_L2
    exact = faiss.IndexFlat(df.shape[1], metric)
    exact.add(df)
    truth = exact.search(qf, K_RECALL)[1]
    r = 1000
    table = Table(f"CIFAR-10 database ({n:,} items, model {args.model}), {nq} queries", nq)
    t0 = time.perf_counter()
    codes = model.encode_features(df)
    encode_s = time.perf_counter() - t0
    flat = DPQIndex(books, assignment=model.config.quantizer.assignment, search_mode=mode)
    flat.add(codes)
    refs = {"float": truth}
    result, wall, cpu = _time(lambda: flat.search(qf, r), args.repeats)
    refs["dpq"] = result[1][:, :K_RECALL]
    base = table.add(
        "DPQ",
        "exhaustive",
        flat.bytes_per_item(),
        encode_s,
        wall,
        cpu,
        result[1][:, :K_RECALL],
        refs,
        map=_map_at(result[1], ql, dl, r),
    )

    def row(method, setting, bytes_per_item, build_s, search):
        """Time search() and add its row: recall on its first K_RECALL ids, mAP@r on all."""
        result, wall, cpu = _time(search, args.repeats)
        ids = result[1]
        recall_ids, score = ids[:, :K_RECALL], _map_at(ids, ql, dl, r)
        table.add(method, setting, bytes_per_item, build_s, wall, cpu, recall_ids, refs, map=score)

    for levels in (1, 2):
        part = DPQIndex(books, search_mode=mode, partition_levels=levels)
        part.add(codes)
        sizes = np.diff(part.cell_offsets)
        print(
            f"  p={levels}: {np.count_nonzero(sizes)} non-empty cells; largest {sizes.max():,} "
            f"items ({sizes.max() / n:.0%})",
            flush=True,
        )
        for nprobe in NPROBES_BY_LEVELS[levels]:
            part.search(qf[:4], r, nprobe=nprobe)
            row(
                f"DPQ p={levels}",
                f"nprobe={nprobe}",
                part.bytes_per_item(),
                encode_s,
                lambda part=part, nprobe=nprobe: part.search(qf, r, nprobe=nprobe),
            )
    t0 = time.perf_counter()
    ivfpq = faiss.index_factory(df.shape[1], "OPQ8_296,IVF256,PQ8", metric)
    faiss.downcast_VectorTransform(ivfpq.chain.at(0)).niter = 20  # as in the synthetic part
    ivfpq.train(df)
    ivfpq.add(df)
    ivf_s = time.perf_counter() - t0
    ivf = faiss.extract_index_ivf(ivfpq)
    for nprobe in NPROBES:
        ivf.nprobe = nprobe
        setting = f"OPQ8_296,IVF256,PQ8 nprobe={nprobe}"
        row("faiss IVF-PQ", setting, ivf.code_size, ivf_s, lambda: ivfpq.search(qf, r))
    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(df.shape[1], 32, metric)
    hnsw.add(df)
    hnsw_s = time.perf_counter() - t0
    for ef in (64, 256, 1024):
        hnsw.hnsw.efSearch = ef
        row(
            "faiss HNSW32 (float)",
            f"efSearch={ef}",
            4 * df.shape[1],
            hnsw_s,
            lambda: hnsw.search(qf, r),
        )
    float_map = _map_at(exact.search(qf, r)[1], ql, dl, r)
    table.print(
        base["qps"],
        [
            ("recall_dpq", "recall@100 vs DPQ exhaustive"),
            ("recall_float", "recall@100 vs float"),
            ("map", "mAP@1000"),
        ],
        [
            f"Features: {feature_s:.0f} s (cached in {args.work_dir}); DPQ build = encoding "
            f"{encode_s:.1f} s. Float exhaustive mAP@1000 = {float_map:.4f}. k=1000 searched "
            "(mAP@1000), recall on the first 100. IVF-PQ: 256 lists = DPQ's K cells at p=1, "
            "trained on the database features.",
            *_target_lines(table, "DPQ p=", "faiss IVF-PQ"),
        ],
    )


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    _setup_threads(args.threads)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    import faiss
    import numba
    import numpy as np

    faiss.omp_set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    print(
        f"# {args.threads} threads; numpy {np.__version__}, numba {numba.__version__}, "
        f"faiss {faiss.__version__}; command: {' '.join(sys.argv)}",
        flush=True,
    )
    shared: dict = {}
    parts = args.parts.split(",")
    started = time.perf_counter()
    if "synthetic" in parts and args.n:
        run_synthetic(args, shared)
    if "codes" in parts and args.codes_n:
        run_codes(args, shared)
    if "cifar10" in parts:
        if args.model.is_dir() and args.split.is_file() and args.images.is_file():
            run_cifar10(args, shared)
        else:
            print(f"\n## CIFAR-10 skipped: {args.model}, {args.split} or {args.images} missing")
    print(f"# total {time.perf_counter() - started:.0f} s, peak RSS {_peak_rss_gib():.1f} GiB")


if __name__ == "__main__":
    main()
