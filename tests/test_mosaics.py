"""dpq.data.mosaics: a multi-label collection from single-label images, and the multi-label
path end to end through the command line (list file, NUS-WIDE split, train, evaluate)."""

import json

import numpy as np
import pytest

from dpq.cli import main
from dpq.data import load_digits, load_source
from dpq.data.mosaics import make_mosaics, write_list_file


def test_a_mosaic_shows_its_tiles_and_carries_their_labels():
    images = np.arange(8 * 2 * 2 * 3, dtype=np.uint8).reshape(8, 2, 2, 3)
    labels = np.array([0, 1, 2, 0, 1, 1, 2, 0])
    mosaics, multi_hot = make_mosaics(images, labels, num_classes=4, grid=2, seed=3)
    assert mosaics.shape == (2, 4, 4, 3) and multi_hot.shape == (2, 4)
    order = np.random.default_rng(3).permutation(8).reshape(2, 2, 2)
    for m in range(2):
        for row in range(2):
            for col in range(2):
                tile = mosaics[m, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2]
                np.testing.assert_array_equal(tile, images[order[m, row, col]])
        np.testing.assert_array_equal(
            multi_hot[m], np.isin(np.arange(4), labels[order[m].ravel()]).astype(np.uint8)
        )
    assert sorted(order.ravel().tolist()) == list(range(8))  # every tile used once
    with pytest.raises(ValueError, match="too few"):
        make_mosaics(images[:3], labels[:3], 4)


def test_the_multilabel_path_end_to_end_through_a_list_file(tmp_path, capsys):
    digits = load_digits()
    mosaics, labels = make_mosaics(np.asarray(digits.images), digits.labels, 10, seed=0)
    listing = write_list_file(tmp_path / "mosaics", mosaics, labels)
    assert listing.read_text().splitlines()[0].split()[1:] == [str(v) for v in labels[0]]
    source = ["--image-root", str(tmp_path / "mosaics"), "--image-size", "16"]
    split = tmp_path / "split.json"
    assert main(["data", "split", str(listing), "--protocol", "nus-wide", "--query-per-class", "40",
                 "--train-per-class", "300", "--out", str(split), "--quiet"]) == 0  # fmt: skip
    assert "train 300 / query 40 / database 409" in capsys.readouterr().out
    run = tmp_path / "run"
    train = [
        "train", str(listing), *source, "--split", str(split), "--backbone", "small_cnn",
        "--width", "0.5", "--num-levels", "2", "--codebook-size", "16", "--dim", "16",
        "--epochs", "3", "--batch-size", "50", "--word-vectors", "orthogonal",
        "--out", str(run), "--quiet",
    ]  # fmt: skip
    assert main(train) == 0
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["model"]["multilabel"] and config["model"]["num_classes"] == 10
    out = tmp_path / "evaluation.json"
    evaluate = ["evaluate", "--model", str(run / "model"), "--images", str(listing), *source]
    assert main([*evaluate, "--split", str(split), "--r", "100", "--out", str(out), "--quiet"]) == 0
    saved = json.loads(out.read_text())
    assert saved["r"] == 100 and saved["query_accuracy"] is None  # no accuracy for multi-label
    # the reported 8-bit (2 x 4 bits) mAP@100 with "shares a label" relevance, by hand
    from dpq.data import Split
    from dpq.index import DPQIndex
    from dpq.model.network import DPQModel

    model = DPQModel.from_checkpoint(run / "model")
    items = load_source(listing, image_root=tmp_path / "mosaics", image_size=16)
    rows = Split.load(split)
    index = DPQIndex(model.codebooks(), search_mode=model.config.model.search_mode)
    index.add(model.encode(items.inputs[rows.database]))
    _, ranked = index.search(model.extract_features(items.inputs[rows.query]), 100)
    relevant = items.labels[rows.query] @ items.labels[rows.database].T > 0
    aps = []
    for q, order in enumerate(ranked):
        hits = relevant[q, order]
        precision = np.cumsum(hits) / np.arange(1, 101)
        aps.append((precision * hits).sum() / max(hits.sum(), 1))
    assert saved["map"]["8"] == pytest.approx(np.mean(aps), abs=1e-9)
