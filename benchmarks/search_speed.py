"""Search speed of DPQIndex against faiss, on synthetic codes (issue 4's table).

Builds N synthetic items (random codes over random residual-style codebooks whose scale
halves per level), then times in one run, with the same thread count everywhere:
DPQIndex.search at every prefix (8/16/24/32 bits for L=4, K=256), faiss's
IndexResidualQuantizer with ST_norm_float lookup-table search on the same codebooks and
codes, exact float search (faiss IndexFlatL2 on the decoded vectors, all queries batched),
the coarse-to-fine rerank trade-off, and the overlap of top-k ids with faiss.
Queries are decoded database items plus noise, so neighbours are meaningful.

    python benchmarks/search_speed.py                 # the full 1,000,000-item table
    python benchmarks/search_speed.py --n 100000      # quick check

Timings are the best of --repeats runs, methods interleaved so background load hits all.
Besides wall-clock queries/s the table gives CPU milliseconds per query (all threads of this
process, time.process_time), which stays meaningful when other jobs share the CPU.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

THREADS_DEFAULT = 2


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="database items (default 1e6)")
    parser.add_argument("--nq", type=int, default=1000, help="queries (default 1000)")
    parser.add_argument("--dim", type=int, default=300, help="feature dimension D (default 300)")
    parser.add_argument("--levels", type=int, default=4, help="num_levels L (default 4)")
    parser.add_argument(
        "--codebook-size", type=int, default=256, help="codewords per level K (default 256)"
    )
    parser.add_argument("--k", type=int, default=100, help="neighbours per query (default 100)")
    parser.add_argument(
        "--threads", type=int, default=THREADS_DEFAULT, help="threads for numba, faiss and BLAS"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (best kept)")
    parser.add_argument(
        "--shortlist", type=int, default=1000, help="rerank shortlist size (default 1000 = 10 k)"
    )
    parser.add_argument(
        "--nprobe",
        type=int,
        default=0,
        help="also time a partitioned copy (partition_levels=1) probing this many cells "
        "(default 0: none)",
    )
    parser.add_argument("--no-flat", action="store_true", help="skip exact IndexFlatL2 search")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import faiss
    import numba
    import numpy as np
    from tqdm import tqdm

    from dpq.index import DPQIndex

    faiss.omp_set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    L, K, D, N, nq, k = args.levels, args.codebook_size, args.dim, args.n, args.nq, args.k
    bits_per_level = int(np.log2(K))

    print(f"# {N:,} items, D={D}, L={L}, K={K}, {nq:,} queries, k={k}, {args.threads} threads")
    print(f"# numba {numba.__version__}, faiss {faiss.__version__}, numpy {np.__version__}")

    scales = 0.5 ** np.arange(L, dtype=np.float32)
    codebooks = (
        rng.standard_normal((L, K, D), dtype=np.float32) * scales[:, None, None]
    ) / np.sqrt(D)
    codes = rng.integers(0, K, size=(N, L), dtype=np.int64).astype(
        np.uint8 if K <= 256 else np.uint16
    )

    t0 = time.perf_counter()
    index = DPQIndex(codebooks)
    index.add(codes)
    print(f"# DPQIndex.add: {time.perf_counter() - t0:.2f} s")
    picks = rng.integers(0, N, size=nq)
    queries = index.decode(codes[picks]) + rng.standard_normal((nq, D), dtype=np.float32) * (
        scales[-1] / np.sqrt(D)
    )
    queries = queries.astype(np.float32)

    partitioned = None
    if args.nprobe:
        partitioned = DPQIndex(codebooks, partition_levels=1)
        partitioned.add(codes)

    t0 = time.perf_counter()
    rq_index = index.to_faiss()
    print(f"# to_faiss: {time.perf_counter() - t0:.2f} s")

    flat = None
    if not args.no_flat:
        flat = faiss.IndexFlatL2(D)
        for start in tqdm(range(0, N, 100_000), desc="decode for IndexFlatL2", leave=False):
            flat.add(index.decode(codes[start : start + 100_000]))

    methods: dict[str, Callable[[], tuple]] = {}
    for levels in range(1, L + 1):
        methods[f"DPQIndex {levels * bits_per_level}-bit (L={levels})"] = lambda levels=levels: (
            index.search(queries, k, num_levels=levels)
        )
    for r0 in range(1, L):
        methods[f"DPQIndex {L * bits_per_level}-bit, rerank_from={r0} ({args.shortlist})"] = (
            lambda r0=r0: index.search(queries, k, rerank_from=r0, rerank_candidates=args.shortlist)
        )
    methods[f"DPQIndex {L * bits_per_level}-bit, mode=ip"] = lambda: index.search(
        queries, k, mode="ip"
    )
    if partitioned is not None:
        methods[f"DPQIndex {L * bits_per_level}-bit, p=1, nprobe={args.nprobe}"] = lambda: (
            partitioned.search(queries, k, nprobe=args.nprobe)
        )
    methods["faiss IndexResidualQuantizer ST_norm_float"] = lambda: rq_index.search(queries, k)
    if flat is not None:
        methods["faiss IndexFlatL2 (decoded, batched)"] = lambda: flat.search(queries, k)

    # warm-up: one untimed pass of every DPQIndex method over the whole batch compiles each
    # kernel its shapes use (numba caches machine code on disk)
    for name, run in methods.items():
        if name.startswith("DPQIndex"):
            run()

    best = {name: float("inf") for name in methods}
    best_cpu = {name: float("inf") for name in methods}
    results = {}
    for _ in tqdm(range(args.repeats), desc="timing rounds", leave=False):
        for name, run in methods.items():
            c0, t0 = time.process_time(), time.perf_counter()
            results[name] = run()
            best[name] = min(best[name], time.perf_counter() - t0)
            best_cpu[name] = min(best_cpu[name], time.process_time() - c0)
    qps = {name: nq / seconds for name, seconds in best.items()}
    cpu_ms = {name: 1e3 * seconds / nq for name, seconds in best_cpu.items()}

    full = f"DPQIndex {L * bits_per_level}-bit (L={L})"
    faiss_name = "faiss IndexResidualQuantizer ST_norm_float"
    flat_name = "faiss IndexFlatL2 (decoded, batched)"
    ref_d, ref_i = results[full]
    faiss_d, faiss_i = results[faiss_name]

    def overlap(ids: np.ndarray, reference: np.ndarray) -> float:
        return float(
            np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids, reference, strict=True)])
        )

    def bytes_per_item(name: str) -> str:
        """Bytes per item the method's search reads (codes + norm, or floats); ids excluded."""
        if name.startswith("DPQIndex"):
            if "mode=ip" in name:
                return f"{index.bytes_per_item(1)}"  # codes only: no norm in ip mode
            levels = L if "L=" not in name else int(name.split("L=")[1].split(")")[0])
            return f"{index.bytes_per_item(levels)}"
        if name == faiss_name:
            return f"{rq_index.code_size}"
        return f"{4 * D}"

    print()
    print(
        "| method | queries/s | x faiss LUT | x exact flat | CPU ms/query | x faiss LUT (CPU) | "
        f"bytes/item | top-{k} overlap with faiss | recall of 32-bit top-{k} |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in methods:
        ids = results[name][1]
        flat_ratio = f"{qps[name] / qps[flat_name]:.2f}" if flat is not None else "-"
        print(
            f"| {name} | {qps[name]:,.0f} | {qps[name] / qps[faiss_name]:.2f} | {flat_ratio} | "
            f"{cpu_ms[name]:.3f} | {cpu_ms[faiss_name] / cpu_ms[name]:.2f} | "
            f"{bytes_per_item(name)} | {overlap(ids, faiss_i):.4f} | {overlap(ids, ref_i):.4f} |"
        )
    print()
    same_rows = np.mean(np.all(ref_i == faiss_i, axis=1))
    differ = ref_i != faiss_i
    tie_ok = np.allclose(ref_d[differ], faiss_d[differ], rtol=1e-5, atol=1e-5)
    print(
        f"DPQIndex {L * bits_per_level}-bit vs faiss: identical top-{k} lists for "
        f"{same_rows:.1%} of queries; positions that differ have equal distances: {tie_ok}; "
        f"max |distance difference| {np.abs(ref_d - faiss_d).max():.2e}"
    )
    one_level = f"DPQIndex {bits_per_level}-bit (L=1)"
    print(
        f"{bits_per_level}-bit / {L * bits_per_level}-bit throughput: "
        f"{qps[one_level] / qps[full]:.2f}x; ids held as int64: 8 bytes/item extra; "
        f"exact flat memory / DPQ {L * bits_per_level}-bit memory: "
        f"{4 * D / index.bytes_per_item(L):.0f}x (without ids); DPQIndex.memory_bytes() / N = "
        f"{index.memory_bytes() / N:.1f} bytes/item (codes, all cached norms, int64 ids)"
    )
    print(f"numba threading layer: {numba.threading_layer()}")
    flags = (
        set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    )
    simd = [
        f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl") if f in flags
    ]
    print(f"CPU SIMD flags: {' '.join(simd) or 'unknown'}")


if __name__ == "__main__":
    main()
