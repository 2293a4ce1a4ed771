"""t-SNE of progressively quantized CIFAR-10 database features (the paper's Fig. 1).

Loads a trained model and the split of a `dpq reproduce cifar10` run, extracts the semantic
features of a random sample of database images, reconstructs them from the first 1..L codes
(8/16/24/32 bits) and writes a 2x2 t-SNE figure.

    python benchmarks/tsne_cifar10.py --run runs/cifar10-30min \
        --data ../shared/data/cifar10/cifar10-jpeg.zip --points 2000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dpq.data import load_cifar10
from dpq.data.splits import Split
from dpq.evaluate.report import plot_tsne
from dpq.index import DPQIndex
from dpq.model.network import DPQModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="output folder of `dpq reproduce cifar10`")
    parser.add_argument("--data", required=True, help="CIFAR-10 source")
    parser.add_argument("--points", type=int, default=2000, help="database images to plot")
    parser.add_argument("--out", default=None, help="PNG (default: RUN/report/tsne.png)")
    args = parser.parse_args()

    run = Path(args.run)
    model = DPQModel.from_checkpoint(run / "model")
    split = Split.load(run / "split.json")
    dataset = load_cifar10(args.data)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(split.database, size=args.points, replace=False))
    features = model.extract_features(np.asarray(dataset.images[rows]))
    index = DPQIndex(model.codebooks(), assignment=model.config.quantizer.assignment)
    codes = index.encode(features)
    bits_per_level = int(np.log2(index.codebook_size))
    by_bits = {
        level * bits_per_level: index.decode(codes[:, :level])
        for level in range(1, index.num_levels + 1)
    }
    out = Path(args.out) if args.out else run / "report" / "tsne.png"
    plot_tsne(by_bits, dataset.labels[rows], out, class_names=dataset.classes)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
