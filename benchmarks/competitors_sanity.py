"""A quick sanity run of the paper's competitors (and DPQ's other methods) on real images: each
method trained a few epochs with the ``cifar10`` recipe's backbone and settings on a small
per-class CIFAR-10 split, its codes indexed and searched by its own distance, mAP printed
beside a random ranking's. Minutes, not the table (that is ``cifar10_table1.py``).

    nice -n 10 python benchmarks/competitors_sanity.py \\
        --data ../shared/data/cifar10/cifar10-jpeg.zip --methods dvsq,dqn,dsh,dhn,hashnet,csq \\
        --bits 32 --epochs 2 --train-per-class 100 --query-per-class 20 --database 2000

Never run by CI.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from dpq.data import load_source, load_word_vectors
from dpq.data.splits import split_per_class
from dpq.evaluate.metrics import map_at_r, relevant_share
from dpq.methods import method_for
from dpq.model.retrieval_network import image_statistics
from dpq.recipes import cifar10_recipe
from dpq.training.loop import ArrayDataset, train_model

WORD_VECTORS = Path(__file__).resolve().parents[1].parent / "shared/data/wordvec/cifar10.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a CIFAR-10 source (zip, folder, batches)")
    parser.add_argument("--methods", default="dvsq,dqn,dsh,dhn,hashnet,csq")
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--query-per-class", type=int, default=20)
    parser.add_argument("--database", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--word-vectors", default=str(WORD_VECTORS))
    parser.add_argument(
        "--options", default="{}", help='JSON method -> options, e.g. {"dsh": {"lr_scale": 0.1}}'
    )
    args = parser.parse_args()
    options = json.loads(args.options)

    source = load_source(args.data, progress=False)
    split = split_per_class(source.labels, args.train_per_class, args.query_per_class, args.seed)
    rng = np.random.default_rng(args.seed)
    database = np.sort(rng.choice(split.database, args.database, replace=False))
    images, labels = np.asarray(source.inputs), source.labels
    train = ArrayDataset(images[split.train], labels[split.train])
    mean, std = image_statistics(train.images)
    word_vectors = load_word_vectors(args.word_vectors, num_classes=len(source.classes))
    chance = relevant_share(labels[split.query], labels[database]).mean()
    print(
        f"{len(split.train)} training, {len(split.query)} query, {len(database)} database "
        f"images; {args.bits} bits, {args.epochs} epochs; chance mAP {chance:.3f}"
    )
    for name in args.methods.split(","):
        config = cifar10_recipe().replace(
            model={"image_mean": mean, "image_std": std, "num_classes": len(source.classes)},
            method={
                "name": name,
                "bits": None if name == "dpq" else args.bits,
                "options": options.get(name, {}),
            },
            train={"epochs": args.epochs, "time_budget_minutes": None, "seed": args.seed},
        )
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as run:
            result = train_model(
                config, train, word_vectors, run, progress=False, log=lambda m: None
            )
        trained = time.perf_counter() - started
        network, method = result.model, method_for(config)
        queries = network.extract_features(images[split.query])
        index = method.new_index(network)
        index.add(method.encode(network, network.extract_features(images[database])))
        _, ranked = method.search(index, queries, k=len(database))
        score = map_at_r(ranked, labels[split.query], labels[database])
        losses = " -> ".join(f"{record['total']:.4g}" for record in result.history)
        print(
            f"{name:8s} {json.dumps(config.method.options)} mAP@{len(database)} {score:.3f}  "
            f"loss {losses}  "
            f"train {trained:.0f} s, total {time.perf_counter() - started:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
