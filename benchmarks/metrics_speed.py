"""Time dpq.evaluate.metrics.map_at_r on a CIFAR-10-sized ranking (1,000 queries x 54,000 items).

Target (issue 3): under 2 s. Run: ``OMP_NUM_THREADS=1 python benchmarks/metrics_speed.py``.
The ranking is a random permutation per query (a worst case for the gather: no locality);
the single-label case uses 10 classes, the multi-label case 21 concepts (NUS-WIDE-like).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dpq.evaluate.metrics import map_at_r, pr_curve, precision_at


def _time(label: str, function, repeats: int) -> None:
    times = []
    value = None
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - start)
    shown = f"{value:.4f}" if isinstance(value, float) else type(value).__name__
    print(f"{label:<44} best {min(times):6.3f} s  median {np.median(times):6.3f} s  -> {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, default=1000, help="number of queries")
    parser.add_argument("--database", type=int, default=54000, help="database size (= R)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per case")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    ranking = np.argsort(rng.random((args.queries, args.database)), axis=1)
    single_db = rng.integers(0, 10, args.database)
    single_q = rng.integers(0, 10, args.queries)
    multi_db = (rng.random((args.database, 21)) < 0.1).astype(np.uint8)
    multi_q = (rng.random((args.queries, 21)) < 0.1).astype(np.uint8)
    print(f"ranking {ranking.shape} {ranking.dtype}")
    _time(
        "map_at_r single-label (retrieved)",
        lambda: map_at_r(ranking, single_q, single_db),
        args.repeats,
    )
    _time(
        "map_at_r single-label (all_relevant)",
        lambda: map_at_r(ranking, single_q, single_db, convention="all_relevant"),
        args.repeats,
    )
    _time(
        "map_at_r multi-label 21 (retrieved)",
        lambda: map_at_r(ranking, multi_q, multi_db),
        args.repeats,
    )
    _time(
        "precision_at 10 ranks, single-label",
        lambda: precision_at(ranking, single_q, single_db, np.arange(100, 1001, 100)),
        args.repeats,
    )
    _time(
        "pr_curve 50 points, single-label",
        lambda: pr_curve(ranking, single_q, single_db),
        args.repeats,
    )


if __name__ == "__main__":
    main()
