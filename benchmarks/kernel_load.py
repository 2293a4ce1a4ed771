"""Seconds a fresh process spends before its first search can run: the first call of each
per-configuration scan kernel (plain, cells, 16-query lanes), which numba either compiles or
loads from its disk cache. Run it twice: the second process should only load.

    python benchmarks/kernel_load.py            # prints one line per kernel

tests/test_index_kernels.py runs it twice with NUMBA_DEBUG_CACHE=1 to check the second
process only loads.
"""

import time

import numpy as np

began = time.perf_counter()
from dpq.index import kernels, lanes  # noqa: E402

print(f"import dpq.index kernels: {time.perf_counter() - began:.2f} s")
codes, luts = np.zeros(10, np.uint32), np.zeros((2, 4 * 256), np.float32)
none = np.zeros(0, np.float32)
out_d, out_r = np.zeros((2, 5), np.float32), np.zeros((2, 5), np.int64)
calls = {
    "scan_kernel(4 levels, packed)": lambda: kernels.scan_kernel(4, 1, True)(
        codes, 0, 10, 256, none, luts, 5, out_d, out_r
    ),
    "cell_scan_kernel(4 levels, 1 cell level, packed)": lambda: kernels.cell_scan_kernel(
        4, 1, 1, True
    )(
        codes,
        np.array([0]),
        np.array([10]),
        np.zeros((2, 1), np.int64),
        256,
        none,
        luts,
        5,
        out_d,
        out_r,
    ),  # fmt: skip
    "lane_scan_kernel(4 levels, packed, 8 lanes)": lambda: lanes.lane_scan_kernel(
        4, 1, True, 8, False
    )(codes, 0, 10, 256, none, luts, 5, out_d, out_r),
}
for name, call in calls.items():
    began = time.perf_counter()
    call()
    print(f"first call of {name}: {time.perf_counter() - began:.2f} s")
