"""dpq.training.reproduce: the CIFAR-10 protocol on a few real CIFAR-10 images, every reported
mAP recomputed from the saved model and split; the paper recipe end to end; a method other
than DPQ through the same protocol."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import CIFAR_ZIP, QUIET, WORDVEC
from dpq.config import DPQConfig, ModelConfig, QuantizerConfig, TrainConfig
from dpq.data import CIFAR10_CLASSES, Split, load_source
from dpq.evaluate.metrics import map_at_r
from dpq.model.network import DPQModel
from dpq.training.experiments import RunSettings
from dpq.training.reproduce import ReproduceSettings, reproduce_cifar10


def _small_cifar(tmp_path: Path, train: int = 10, test: int = 5) -> Path:
    small = tmp_path / "cifar-small.zip"
    with zipfile.ZipFile(CIFAR_ZIP) as full, zipfile.ZipFile(small, "w") as out:
        names = full.namelist()
        for split, count in (("train", train), ("test", test)):
            for name in CIFAR10_CLASSES:
                members = sorted(n for n in names if n.startswith(f"{split}/{name}/"))
                for member in [m for m in members if m.endswith(".jpg")][:count]:
                    out.writestr(member, full.read(member))
    return small


@pytest.mark.skipif(
    not CIFAR_ZIP.is_file(), reason=f"the offline CIFAR-10 copy is not at {CIFAR_ZIP}"
)
def test_reproduce_cifar10_reports_what_its_model_and_split_give(tmp_path, monkeypatch):
    """The reproduce flow (load, split, train, encode, search, results, report) on 150 real
    CIFAR-10 images with a small per-class split; every reported mAP is recomputed from the
    saved model and split with a plain exhaustive ranking."""
    monkeypatch.setenv("DPQ_CACHE_DIR", str(tmp_path / "cache"))
    small = _small_cifar(tmp_path)
    recipe = DPQConfig(
        model=ModelConfig(backbone_kwargs={"width": 0.125}),
        # 80 training images < K: codebooks start from N(0, 0.01) instead of k-means
        quantizer=QuantizerConfig(num_levels=2, codebook_size=256, dim=300, init="normal"),
        train=TrainConfig(batch_size=40),
    )
    result = reproduce_cifar10(
        ReproduceSettings(
            data=small,
            base_config=recipe,
            epochs=1,
            train_per_class=8,
            query_per_class=2,
            split_seed=4,
        ),
        RunSettings(tmp_path / "run", word_vectors=WORDVEC / "cifar10.txt", **QUIET),
    )
    evaluation = result.evaluation
    assert (evaluation.num_queries, evaluation.num_database, evaluation.r) == (20, 50, 50)
    split = Split.load(tmp_path / "run" / "split.json")
    assert split.seed == 4 and result.split_seed == 4
    model = DPQModel.from_checkpoint(tmp_path / "run" / "model")
    source = load_source(small)
    query, database = source.inputs[split.query], source.inputs[split.database]
    query_features = model.extract_features(query)
    database_features = model.extract_features(database)
    codes = model.encode_features(database_features)
    for levels, bits in ((1, 8), (2, 16)):
        reconstruction = sum(model.codebooks()[level][codes[:, level]] for level in range(levels))
        distances = ((query_features[:, None, :] - reconstruction[None]) ** 2).sum(2)
        ranking = np.argsort(distances, axis=1, kind="stable")
        expected = map_at_r(ranking, source.labels[split.query], source.labels[split.database])
        assert evaluation.map_by_bits[bits] == pytest.approx(expected, abs=1e-6)
    logits = model.extract_features_and_logits(query)[1]
    assert evaluation.query_accuracy == pytest.approx(
        (logits.argmax(1) == source.labels[split.query]).mean()
    )
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["evaluation"]["map"] == {str(b): v for b, v in evaluation.map_by_bits.items()}
    assert saved["epochs"] == 1 and saved["split_seed"] == 4 and saved["precision"] == "fp32"
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "paper DPQ" in report and (tmp_path / "run" / "report" / "pr_16bits.png").is_file()
    assert "split seed 4" in (tmp_path / "run" / "results.md").read_text()


@pytest.mark.skipif(
    not CIFAR_ZIP.is_file(), reason=f"the offline CIFAR-10 copy is not at {CIFAR_ZIP}"
)
def test_the_paper_recipe_runs_end_to_end_on_a_cpu(tmp_path, monkeypatch, no_network):
    """`--config paper` on 40 real CIFAR-10 images: a (random) AlexNet's fc7, 32 px images
    read at 227 px inside the model, every loss end to end from the first step. Only K (8,
    for 20 training images), the epochs and, to keep the test small, frozen conv1..fc6
    differ from the recipe (weights files: tests/test_trainer.py, tests/test_backbones.py)."""
    from dpq.recipes import paper_recipe

    monkeypatch.setenv("DPQ_CACHE_DIR", str(tmp_path / "cache"))
    recipe = paper_recipe().replace(
        quantizer={"codebook_size": 8}, train={"freeze_stages": 6, "keep_checkpoints": 1}
    )
    result = reproduce_cifar10(
        ReproduceSettings(
            data=_small_cifar(tmp_path, train=3, test=1),
            base_config=recipe,
            epochs=1,
            train_per_class=2,
            query_per_class=1,
        ),
        RunSettings(tmp_path / "run", word_vectors=WORDVEC / "cifar10.txt", **QUIET),
    )
    config = result.train.model.config
    assert config.model.image_size == 227 and config.model.backbone == "alexnet"
    assert set(result.evaluation.map_by_bits) == {3, 6, 9, 12}
    assert result.evaluation.num_database == 10
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["train"]["schedule"] == "end_to_end"


def test_another_method_goes_through_the_same_protocol(tmp_path, monkeypatch, small_cifar_zip):
    """`dpq reproduce cifar10 --method sign --bits 16` as a library call on 50 real CIFAR-10
    images: the recipe's network with the sign head, its 16-bit codes searched by Hamming
    distance, the mAP recomputed from the saved model, and results that say the method."""
    from dpq.evaluate.report import format_results_table
    from dpq.methods import load_network

    monkeypatch.setenv("DPQ_CACHE_DIR", str(tmp_path / "cache"))
    recipe = DPQConfig(
        model=ModelConfig(backbone_kwargs={"width": 0.125}), train=TrainConfig(batch_size=20)
    ).replace(method={"name": "sign", "bits": 16})
    protocol = ReproduceSettings(
        data=small_cifar_zip, base_config=recipe, epochs=1, train_per_class=2, query_per_class=1
    )
    result = reproduce_cifar10(protocol, RunSettings(tmp_path / "run", **QUIET))  # no word vectors
    evaluation = result.evaluation
    assert list(evaluation.map_by_bits) == [16] and evaluation.num_database == 20
    assert evaluation.query_accuracy is None  # no classifier
    network = load_network(tmp_path / "run" / "model")
    split = Split.load(tmp_path / "run" / "split.json")
    source = load_source(small_cifar_zip)
    query = network.extract_features(source.inputs[split.query]) > 0
    database = network.extract_features(source.inputs[split.database]) > 0
    ranking = np.argsort((query[:, None] != database[None]).sum(2), axis=1, kind="stable")
    expected = map_at_r(ranking, source.labels[split.query], source.labels[split.database])
    assert evaluation.map_by_bits[16] == pytest.approx(expected, abs=1e-12)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (saved["method"], saved["bits"]) == ("sign", [16])
    assert saved["evaluation"]["map"] == {"16": evaluation.map_by_bits[16]}
    assert "Hamming distance over the codes" in saved["protocol"]
    markdown = (tmp_path / "run" / "results.md").read_text()
    assert "Method: `sign`, codes of 16 bits searched by Hamming distance." in markdown
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "sign training" in report and (tmp_path / "run" / "report" / "pr_16bits.png").is_file()
    assert "16 bit" in format_results_table(evaluation)
