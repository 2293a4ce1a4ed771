"""The path of ``dpq search``'s arguments down to the numba scan: modules passed through, and
how often the path climbs back to a module it had already left.

Runs ``dpq search`` in-process on a small random index (every search setting: exhaustive,
probed cells, re-rank) with a profiler that records the dpq call stack at the moment each
compiled scan kernel of :mod:`dpq.index.kernels` is entered, and every dpq function called
from the command's ``run`` (its arguments parsed) until then, in time order. For each it prints the modules in order,
the number of stays (runs of calls in one module), distinct modules, and climbs (a stay in a
module already left).

    python benchmarks/call_path.py

Never run by CI.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from dpq.cli import main as dpq_main
from dpq.index import DPQIndex

COMMAND_ENTRIES = {("dpq.cli.search", "run"), ("dpq.cli", "_cmd_search")}
"""Where ``dpq search`` starts once its arguments are parsed (this tree, and the one-module
CLI of before the architecture issue, to measure both with this script)."""
SETTINGS = {
    "exhaustive": [],
    "probed cells": ["--nprobe", "4"],
    "re-rank": ["--rerank-from", "2", "--num-levels", "4"],
}


def _index(folder: Path, partitioned: bool) -> Path:
    rng = np.random.default_rng(0)
    codebooks = rng.normal(size=(4, 16, 8)).astype(np.float32)
    index = DPQIndex(codebooks, partition_levels=1 if partitioned else 0)
    index.add(rng.integers(0, 16, size=(2000, 4)).astype(np.uint8))
    return index.save(folder / ("cells.npz" if partitioned else "flat.npz"))


def _dpq_stays(frame) -> list[str]:
    """The dpq modules of the stack ending at ``frame``, outermost first, repeats merged."""
    modules = []
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith("dpq") and (not modules or modules[-1] != name):
            modules.append(name)
        frame = frame.f_back
    return modules[::-1]


def trace_to_scan(argv: list[str]) -> tuple[list[list[str]], list[str], list[str]]:
    """The distinct dpq module stacks (outermost first) seen when a kernel is entered, and
    the time-ordered modules of every dpq function called until the first kernel call, and
    the up-calls among them: a call into a module that is already on the stack above the
    caller (a climb back up to a module left lower down)."""
    stacks: list[list[str]] = []
    calls: list[str] = []
    upcalls: set[str] = set()

    def profile(frame, event, arg):
        if event != "call":
            return
        name = frame.f_globals.get("__name__", "")
        if not calls and (name, frame.f_code.co_name) not in COMMAND_ENTRIES:
            return  # not yet in the command (argument parsing, parser building)
        if not stacks and name.startswith("dpq"):
            calls.append(name)
            caller = _dpq_stays(frame.f_back)
            if caller and caller[-1] != name and name in caller[:-1]:
                upcalls.add(f"{caller[-1]} -> {name}")
        if name != "dpq.index.kernels":
            return
        modules = []
        walker = frame
        while walker is not None:
            name = walker.f_globals.get("__name__", "")
            if name.startswith("dpq"):
                modules.append(name)
            walker = walker.f_back
        modules.reverse()
        if modules not in stacks:
            stacks.append(modules)

    sys.setprofile(profile)
    try:
        dpq_main(argv)
    finally:
        sys.setprofile(None)
    return stacks, calls, sorted(upcalls)


def describe(modules: list[str]) -> tuple[list[str], int, int]:
    """(stays: modules with consecutive repeats merged, distinct modules, climbs)."""
    stays: list[str] = []
    for name in modules:
        if not stays or stays[-1] != name:
            stays.append(name)
    climbs = sum(1 for i, name in enumerate(stays) if name in stays[:i])
    return stays, len(set(stays)), climbs


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        queries = folder / "queries.npy"
        np.save(queries, np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32))
        for label, extra in SETTINGS.items():
            index = _index(folder, partitioned=label == "probed cells")
            argv = ["search", "--index", str(index), "--features", str(queries), "--k", "5"]
            argv += ["--quiet", "--out", str(folder / "out.json"), *extra]
            worst = None
            stacks, calls, upcalls = trace_to_scan(argv)
            for modules in stacks:
                stays, distinct, climbs = describe(modules)
                if worst is None or climbs > worst[2] or len(stays) > len(worst[0]):
                    worst = (stays, distinct, climbs)
            stays, distinct, climbs = worst
            print(
                f"{label}: the stack at the scan: {len(stays)} stays in {distinct} modules, "
                f"{climbs} climbs back"
            )
            print("   " + " -> ".join(name.removeprefix("dpq.") for name in stays))
            print(
                f"   up-calls (into a module already on the stack): {len(upcalls)} "
                + ", ".join(upcalls)
            )
            stays, distinct, climbs = describe(calls)
            print(
                f"   every call from the command to the scan: {len(stays)} stays in {distinct} "
                f"modules, {climbs} returns to a module visited before"
            )
            print("   " + " -> ".join(name.removeprefix("dpq.") for name in stays))


if __name__ == "__main__":
    main()
