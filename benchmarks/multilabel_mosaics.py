"""The multi-label (NUS-WIDE) path end to end on 2x2 mosaics of CIFAR-10 images.

NUS-WIDE's images cannot be had offline. Its path can: every CIFAR-10 image (all 60,000)
is used in exactly one mosaic of four (a seeded permutation cut into groups of four), so
15,000 mosaics of 64x64 pixels, each labelled with the classes among its tiles (multi-hot,
one to four of the ten labels). They are written as PNG files with a list file in the
NUS-WIDE format (``<path> <10 binary labels>``) and then go through the command line exactly
as a user's NUS-WIDE list would:

    dpq data split mosaics.txt --protocol nus-wide --n-query 2000 --n-train 5000
    dpq train mosaics.txt --image-root DIR --split split.json --config cifar10 --label-smoothing 0 ...
    dpq evaluate --model RUN/model --images mosaics.txt --image-root DIR --split split.json \\
        --r 5000 --baselines rq,pq,opq,lsq

The NUS-WIDE protocol of the paper: random queries, the database is the rest, training items
drawn from the database, mAP@5000, relevant = shares at least one label. Training uses the
sigmoid L_C and the multi-label L_S (both follow from multi-hot labels). Never run by CI.

    python benchmarks/multilabel_mosaics.py --cifar ../shared/data/cifar10/cifar10-jpeg.zip \\
        --work /tmp/mosaics --epochs 30
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dpq.cli import main as dpq
from dpq.data import load_source
from dpq.data.mosaics import make_mosaics, write_list_file


def build(cifar: str, work: Path, seed: int) -> Path:
    listing = work / "mosaics.txt"
    if listing.is_file():
        print(f"using the mosaics already in {work}")
        return listing
    source = load_source(cifar)
    mosaics, labels = make_mosaics(np.asarray(source.inputs), source.labels, 10, seed=seed)
    counts = labels.sum(axis=1)
    print(
        f"{len(mosaics):,} mosaics {mosaics.shape[1]}x{mosaics.shape[2]}; labels per mosaic: "
        + ", ".join(f"{k}: {int((counts == k).sum()):,}" for k in range(1, 5))
    )
    return write_list_file(work, mosaics, labels, name="mosaics.txt")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar", required=True, help="CIFAR-10 source")
    parser.add_argument("--work", required=True, help="folder for the mosaics and the runs")
    parser.add_argument("--word-vectors", help="CIFAR-10 word vectors (default: beside --cifar)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (30)")
    parser.add_argument("--feature", default="semantic", help="semantic or class_posterior")
    parser.add_argument("--baselines", default="rq,pq,opq,lsq", help="baselines beside DPQ")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mosaics and the split")
    args = parser.parse_args()
    work = Path(args.work)
    listing = build(args.cifar, work, args.seed)
    words = args.word_vectors or str(
        Path(args.cifar).resolve().parent.parent / "wordvec" / "cifar10.txt"
    )
    split = work / f"split-seed{args.seed}.json"
    images = ["--image-root", str(work), "--image-size", "64"]
    if not split.is_file():
        assert dpq(["data", "split", str(listing), "--protocol", "nus-wide", "--n-query",
                    "2000", "--n-train", "5000", "--seed", str(args.seed), "--out", str(split),
                    "--quiet"]) == 0  # fmt: skip
    run = work / f"run-{args.feature}-{args.epochs}ep-seed{args.seed}"
    code = dpq(["train", str(listing), *images, "--split", str(split), "--config", "cifar10", "--label-smoothing", "0",
                "--feature", args.feature, "--epochs", str(args.epochs), "--word-vectors",
                words, "--out", str(run), *(["--resume"] if (run / "checkpoints").is_dir() else [])])  # fmt: skip
    if code != 0 and not (run / "model" / "config.json").is_file():
        return code
    out = run / "evaluation.json"
    code = dpq(["evaluate", "--model", str(run / "model"), "--images", str(listing), *images,
                "--split", str(split), "--r", "5000", "--baselines", args.baselines,
                "--out", str(out)])  # fmt: skip
    if code == 0:
        saved = json.loads(out.read_text())
        print(json.dumps({"map": saved["details"]["map"], "float": saved["float_map"]}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
