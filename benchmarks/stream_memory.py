"""Peak memory of `dpq encode` over a folder of 224 px JPEGs: read on demand (--loading
stream, --workers 2) against decoded up front (--loading memory), at two collection sizes.

The network is a small one (a random small_cnn that reads the 224 px images shrunk to
32 px inside the model, ``model.image_size``): what grows with the collection is the
images, not the network. Every run is a fresh `dpq encode` process; a
sampling thread reads /proc every 20 ms for the main process's RSS and the proportional
set size (PSS: shared pages split between the processes) of the main process plus its
DataLoader workers. Prints one table; the claim is that the streaming rows do not grow
with the collection while the in-memory rows grow by its decoded size.

    flock /tmp/dpq-heavy.lock python benchmarks/stream_memory.py --sizes 3000 12000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, count: int, side: int = 224, classes: int = 10, seed: int = 0) -> None:
    """``count`` smooth random JPEGs (quality 90) in ``classes`` class folders."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        folder = root / f"class{index % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, size=(side // 16, side // 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC)
        image.save(folder / f"{index:06d}.jpg", quality=90)


def save_tiny_model(path: Path) -> None:
    import torch

    from dpq.config import DPQConfig, ModelConfig, QuantizerConfig
    from dpq.model.network import DPQModel

    torch.manual_seed(0)
    config = DPQConfig(
        model=ModelConfig(
            backbone="small_cnn", backbone_kwargs={"width": 0.25}, num_classes=10, image_size=32
        ),
        quantizer=QuantizerConfig(num_levels=2, codebook_size=16, dim=8),
    )
    DPQModel(config).save_checkpoint(path)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def measure(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``argv``; peak RSS of the main process and peak PSS of it plus its children (MiB),
    the worker count seen, and the wall time."""
    began = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = {"rss": 0, "pss": 0, "workers": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                pids = [process.pid, *_children(process.pid)]
                peak["rss"] = max(peak["rss"], _rss_kib(process.pid))
                peak["pss"] = max(peak["pss"], sum(_pss_kib(p) for p in pids))
                peak["workers"] = max(peak["workers"], len(pids) - 1)
            except (OSError, ValueError):
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = process.communicate()
    done.set()
    thread.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{err.decode()}")
    return {
        "rss_mib": peak["rss"] / 1024,
        "pss_mib": peak["pss"] / 1024,
        "workers": peak["workers"],
        "seconds": time.perf_counter() - began,
        "out": out.decode().strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 12000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=["stream", "memory"])
    parser.add_argument("--workdir", help="keep the folders here (default: a temporary one)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with tempfile.TemporaryDirectory(prefix="dpq-stream-mem-") as scratch:
        work = Path(args.workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        model = work / "model"
        if not model.exists():
            save_tiny_model(model)
        rows = []
        for size in args.sizes:
            folder = work / f"images-{size}"
            if not folder.exists():
                began = time.perf_counter()
                make_folder(folder, size)
                print(f"made {size} JPEGs in {time.perf_counter() - began:.1f} s", flush=True)
            for mode in args.modes:
                argv = [sys.executable, "-m", "dpq.cli", "encode", "--model", str(model)]
                argv += ["--images", str(folder), "--image-size", "224", "--loading", mode]
                argv += ["--workers", str(args.workers), "--device", "cpu", "--quiet"]
                argv += ["--batch-size", str(args.batch_size)]
                argv += ["--out", str(work / f"index-{size}-{mode}.npz")]
                result = measure(argv, env)
                decoded = size * 224 * 224 * 3 / 2**20
                rows.append((size, mode, decoded, result))
                print(
                    f"{size:>7,} {mode:>6}: peak RSS {result['rss_mib']:.0f} MiB, "
                    f"peak PSS with workers {result['pss_mib']:.0f} MiB, "
                    f"{result['workers']} workers, {result['seconds']:.1f} s",
                    flush=True,
                )
    print()
    print(
        "| images | loading | decoded size (MiB) | peak RSS main (MiB) | peak PSS main + workers (MiB) | wall (s) |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    for size, mode, decoded, result in rows:
        print(
            f"| {size:,} | {mode} | {decoded:,.0f} | {result['rss_mib']:,.0f} | "
            f"{result['pss_mib']:,.0f} | {result['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
