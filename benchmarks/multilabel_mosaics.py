"""The multi-label (NUS-WIDE) path end to end on 2x2 mosaics of CIFAR-10 images.

NUS-WIDE's images cannot be had offline. Its path can: every CIFAR-10 image (all 60,000)
is used in exactly one mosaic of four (a seeded permutation cut into groups of four), so
15,000 mosaics of 64x64 pixels, each labelled with the classes among its tiles (multi-hot,
one to four of the ten labels). They are written as PNG files with a list file in the
NUS-WIDE format (``<path> <10 binary labels>``) and then go through the command line exactly
as a user's NUS-WIDE list would:

    dpq data split mosaics.txt --protocol nus-wide --query-per-class 2000 --train-per-class 5000
    dpq train mosaics.txt --image-root DIR --split split.json --config cifar10 --label-smoothing 0 ...
    dpq evaluate --model RUN/model --images mosaics.txt --image-root DIR --split split.json \\
        --r 5000 --baselines rq,pq,opq,lsq

The NUS-WIDE protocol of the paper: random queries, the database is the rest, training items
drawn from the database, mAP@5000, relevant = shares at least one label. Training uses the
sigmoid L_C and the multi-label L_S (both follow from multi-hot labels). Never run by CI.

    python benchmarks/multilabel_mosaics.py --cifar ../shared/data/cifar10/cifar10-jpeg.zip \\
        --work /tmp/mosaics --epochs 30 --seed 0     # then --seed 1, --seed 2
    python benchmarks/multilabel_mosaics.py --work /tmp/mosaics --summarize

Each seed has its own mosaics and split (``WORK/seedS/``) and run. After every run, and with
``--summarize``, the runs of WORK are tabulated: mean ± sample standard deviation over the
seeds per method and code length, and the mAP of a random ranking (the share of relevant
(query, database) pairs: its expected precision at every rank).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from dpq.cli import main as dpq
from dpq.data import load_source
from dpq.data.lists import read_list_file
from dpq.data.mosaics import make_mosaics, write_list_file
from dpq.data.splits import Split
from dpq.evaluate.metrics import relevant_share
from dpq.evaluate.report import format_mean_std

BITS = ["8", "16", "24", "32"]


def build(cifar: str, folder: Path, seed: int) -> Path:
    """The mosaics of ``seed`` as PNG files under ``folder`` with their list file."""
    listing = folder / "mosaics.txt"
    if listing.is_file():
        print(f"using the mosaics already in {folder}")
        return listing
    source = load_source(cifar)
    mosaics, labels = make_mosaics(np.asarray(source.inputs), source.labels, 10, seed=seed)
    counts = labels.sum(axis=1)
    print(
        f"{len(mosaics):,} mosaics {mosaics.shape[1]}x{mosaics.shape[2]}; labels per mosaic: "
        + ", ".join(f"{k}: {int((counts == k).sum()):,}" for k in range(1, 5))
    )
    return write_list_file(folder, mosaics, labels, name="mosaics.txt")


def random_ranking_map(listing: Path, split_path: Path) -> float:
    """A random ranking's expected mAP: the mean share of the database that shares a label
    with each query."""
    labels = read_list_file(listing).labels  # uint8 (N, 10) multi-hot
    split = Split.load(split_path)
    return float(relevant_share(labels[split.query], labels[split.database]).mean())


def summarize(work: Path) -> str:
    """Markdown table over every evaluated run in ``work`` (one row group per feature and
    epochs): mean ± std over the seeds per method and code length."""
    groups: dict[str, dict[int, dict]] = defaultdict(dict)
    for out in sorted(work.glob("seed*/run-*-seed*/evaluation.json")):
        feature_epochs, seed = out.parent.name[len("run-") :].rsplit("-seed", 1)
        saved = json.loads(out.read_text())
        saved["random"] = random_ranking_map(
            out.parent.parent / "mosaics.txt", out.parent.parent / "split.json"
        )
        groups[feature_epochs][int(seed)] = saved
    if not groups:
        return f"no evaluated runs under {work} (WORK/seedS/run-*/evaluation.json)"

    lines = []
    for feature_epochs, by_seed in groups.items():
        runs = [by_seed[s] for s in sorted(by_seed)]
        lines += [
            f"## {feature_epochs}, seeds {', '.join(map(str, sorted(by_seed)))}: mAP@5000",
            "",
            "| method | " + " | ".join(f"{b} bits" for b in BITS) + " |",
            "|---|" + "---|" * len(BITS),
        ]
        methods = list(dict.fromkeys(m for r in runs for m in r["details"]["map"]))
        for method in methods:
            cells = [format_mean_std([r["details"]["map"][method][b] for r in runs]) for b in BITS]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append(f"| float (exact) | {format_mean_std([r['float_map'] for r in runs])} | | | |")
        lines.append(f"| a random ranking | {format_mean_std([r['random'] for r in runs])} | | | |")
        lines.append("")
        baselines = [m for m in methods if m != "dpq"]
        for bits in BITS if "dpq" in methods and baselines else []:
            best = max(
                baselines,
                key=lambda m: statistics.fmean(r["details"]["map"][m][bits] for r in runs),
            )
            diffs = [
                r["details"]["map"]["dpq"][bits] - r["details"]["map"][best][bits] for r in runs
            ]
            lines.append(
                f"- {bits} bits: DPQ - {best} (the best baseline), paired by seed: "
                f"{format_mean_std(diffs)} (" + ", ".join(f"{d:+.4f}" for d in diffs) + ")"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar", help="CIFAR-10 source (required unless --summarize)")
    parser.add_argument("--work", required=True, help="folder for the mosaics and the runs")
    parser.add_argument("--word-vectors", help="CIFAR-10 word vectors (default: beside --cifar)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (30)")
    parser.add_argument("--feature", default="semantic", help="semantic or class_posterior")
    parser.add_argument("--baselines", default="rq,pq,opq,lsq", help="baselines beside DPQ")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mosaics and the split")
    parser.add_argument(
        "--summarize", action="store_true", help="only tabulate the runs already in --work"
    )
    args = parser.parse_args()
    work = Path(args.work)
    if args.summarize:
        print(summarize(work))
        return 0
    if not args.cifar:
        parser.error("--cifar is required (the CIFAR-10 archive, folder or zip)")
    folder = work / f"seed{args.seed}"
    listing = build(args.cifar, folder, args.seed)
    words = args.word_vectors or str(
        Path(args.cifar).resolve().parent.parent / "wordvec" / "cifar10.txt"
    )
    split = folder / "split.json"
    images = ["--image-root", str(folder), "--image-size", "64"]
    if not split.is_file():
        assert dpq(["data", "split", str(listing), "--protocol", "nus-wide",
                    "--query-per-class", "2000", "--train-per-class", "5000",
                    "--split-seed", str(args.seed), "--out", str(split), "--quiet"]) == 0  # fmt: skip
    run = folder / f"run-{args.feature}-{args.epochs}ep-seed{args.seed}"
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
        print(summarize(work))
    return code


if __name__ == "__main__":
    sys.exit(main())
