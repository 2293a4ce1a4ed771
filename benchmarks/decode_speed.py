"""How fast images decode: one thread vs dpq's worker threads vs a process pool, in one run.

Decodes the same files three ways with ``dpq.data.decode`` and prints images/s and the ratio
to one thread. Two collections: the CIFAR-10 zip (60,000 32x32 JPEGs) and, with
``--photos N``, N synthetic 640x480 JPEG photos resized to 224x224 (where the decoder and the
resize, which release the GIL, dominate). A cold ``load_cifar10`` (no decoded-array cache) is
timed too. Never run by CI.

    python benchmarks/decode_speed.py --cifar ../shared/data/cifar10/cifar10-jpeg.zip --photos 2000
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import numpy as np
from PIL import Image

from dpq.data import load_cifar10
from dpq.data.decode import CHUNK_SIZE, ImageStore, _decode_chunk, decode_many


def _process_pool(store: ImageStore, names: list[str], size, workers: int) -> int:
    """The decoder dpq used before: chunks decoded by a spawn process pool."""
    import multiprocessing

    chunks = [names[i : i + CHUNK_SIZE] for i in range(0, len(names), CHUNK_SIZE)]
    context = multiprocessing.get_context("spawn")
    count = 0
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for arrays, _ in pool.map(_decode_chunk, repeat(store), chunks, repeat(size)):
            count += len(arrays)
    return count


def _time(label: str, job, count: int, baseline: float | None) -> float:
    began = time.perf_counter()
    job()
    seconds = time.perf_counter() - began
    ratio = "" if baseline is None else f"  {baseline / seconds:5.2f}x one thread"
    print(f"  {label:<28} {seconds:7.2f} s  {count / seconds:9,.0f} img/s{ratio}")
    return seconds


def compare(store: ImageStore, names: list[str], size, workers: int, title: str) -> None:
    print(f"{title}: {len(names):,} images")
    one = _time(
        "one thread", lambda: decode_many(store, names, size, workers=1, progress=False),
        len(names), None,
    )  # fmt: skip
    _time(
        f"{workers} threads (dpq)",
        lambda: decode_many(store, names, size, workers=workers, progress=False),
        len(names),
        one,
    )
    _time(
        f"{workers}-process spawn pool",
        lambda: _process_pool(store, names, size, workers),
        len(names),
        one,
    )


def synthetic_photos(folder: Path, count: int) -> list[str]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    names = []
    for i in range(count):
        image = Image.fromarray(np.roll(base, i, axis=1)).resize((640, 480), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        (folder / f"{i:05d}.jpg").write_bytes(buffer.getvalue())
        names.append(f"{i:05d}.jpg")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar", help="the CIFAR-10 zip of JPEGs")
    parser.add_argument("--photos", type=int, default=0, help="synthetic 640x480 photos to add")
    parser.add_argument("--workers", type=int, default=2, help="threads / processes (2)")
    args = parser.parse_args()
    if args.cifar:
        store = ImageStore(args.cifar)
        names = sorted(n for n in zipfile.ZipFile(args.cifar).namelist() if n.endswith(".jpg"))
        compare(store, names, None, args.workers, "CIFAR-10 zip (32x32 JPEG)")
        with tempfile.TemporaryDirectory() as cache:
            began = time.perf_counter()
            dataset = load_cifar10(args.cifar, cache_dir=cache, progress=False)
            print(
                f"  cold load_cifar10 (decode + cache): {time.perf_counter() - began:.2f} s for "
                f"{len(dataset):,} images"
            )
    if args.photos:
        with tempfile.TemporaryDirectory() as folder:
            names = synthetic_photos(Path(folder), args.photos)
            compare(ImageStore(folder), names, (224, 224), args.workers, "photos 640x480 -> 224")


if __name__ == "__main__":
    main()
