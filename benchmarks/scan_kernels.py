"""One-thread speed of the full-scan kernels, in ns per (item, query), on random codes.

Times dpq.index.kernels.scan_kernel (one query per pass) and dpq.index.lanes at each lane
width (several queries per pass) on N random packed codes with norms, and, with
--baseline, the scan_kernel of another kernels.py (e.g. main's) in the same process, so
before and after share the machine's load. Every kernel's top-k must equal the first one's
bit for bit (the script stops otherwise). CPU time of this thread (time.thread_time), best
of --repeats, kernels interleaved.

    python benchmarks/scan_kernels.py --baseline /work/main/src/dpq/index/kernels.py
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="items (default 1e6)")
    parser.add_argument("--nq", type=int, default=32, help="queries (default 32)")
    parser.add_argument("--levels", type=int, default=4, help="num_levels L, K=256 (default 4)")
    parser.add_argument("--k", type=int, default=100, help="neighbours per query (default 100)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per kernel (best kept)")
    parser.add_argument(
        "--widths", default="4,8,16,32", help="lane widths to time (default 4,8,16,32)"
    )
    parser.add_argument("--baseline", type=Path, help="another kernels.py to time beside these")
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    import numpy as np

    from dpq.index import kernels, lanes

    n, nq, levels, k = args.n, args.nq, args.levels, args.k
    if not 1 <= levels <= 4:
        raise SystemExit("--levels must be 1..4 (one packed word of uint8 codes per item)")
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2**32, n, dtype=np.uint32)  # 4 random uint8 codes per word
    norms = rng.random(n).astype(np.float32) if levels > 1 else np.empty(0, np.float32)
    luts = rng.standard_normal((nq, levels * 256)).astype(np.float32)
    scans: dict[str, Callable] = {}
    if args.baseline is not None:
        spec = importlib.util.spec_from_file_location("baseline_kernels", args.baseline)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
        scans[f"baseline scan_kernel ({args.baseline})"] = baseline.scan_kernel(levels, 1, True)
    scans["kernels.scan_kernel (1 query per pass)"] = kernels.scan_kernel(levels, 1, True)
    for width in (int(w) for w in args.widths.split(",")):
        scans[f"lanes, {width} queries per pass"] = lanes.lane_scan_kernel(
            levels, 1, True, width, levels > 1
        )

    def run(scan: Callable) -> tuple[np.ndarray, np.ndarray]:
        out_d, out_r = np.empty((nq, k), np.float32), np.empty((nq, k), np.int64)
        scan(codes, 0, n, 256, norms, luts, k, out_d, out_r)
        return out_d, out_r

    reference = None
    for name, scan in scans.items():  # compiles, and checks every result
        got = run(scan)
        reference = got if reference is None else reference
        if not (np.array_equal(got[0], reference[0]) and np.array_equal(got[1], reference[1])):
            raise SystemExit(f"{name}: top-{k} differs from the first kernel's")
    best = dict.fromkeys(scans, float("inf"))
    for _ in range(args.repeats):
        for name, scan in scans.items():
            start = time.thread_time()
            run(scan)
            best[name] = min(best[name], time.thread_time() - start)
    first = next(iter(best.values()))
    print(f"# {n:,} items, L={levels}, K=256, {nq} queries, k={k}, one thread; all top-{k} equal")
    print("| kernel | ns per (item, query) | speed-up | queries/s per thread |")
    print("|---|---:|---:|---:|")
    for name, seconds in best.items():
        print(
            f"| {name} | {1e9 * seconds / (n * nq):.3f} | {first / seconds:.2f} | "
            f"{nq / seconds:,.0f} |"
        )


if __name__ == "__main__":
    main()
