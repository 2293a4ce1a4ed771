"""dpq.training.experiments: prepare_run, train_run (checks before writes), the demo and the CIFAR-10
reproduction, checked against an independent recomputation of their numbers."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import CIFAR_ZIP, QUIET, WORDVEC, digits_config
from dpq.config import DPQConfig, ModelConfig, QuantizerConfig, TrainConfig
from dpq.data import CIFAR10_CLASSES, Split, load_source
from dpq.evaluate.metrics import map_at_r
from dpq.index import DPQIndex
from dpq.model.network import DPQModel
from dpq.training.experiments import prepare_run, reproduce_cifar10, run_demo, train_run


def test_prepare_run_splits_completes_the_config_and_resolves_word_vectors():
    source = load_source("digits")
    prepared = prepare_run(digits_config(), source, "per-class", 20, 5, 3, "orthogonal")
    assert prepared.split.sizes == {"train": 200, "query": 50, "database": 1547}
    assert len(prepared.train_data.labels) == 200
    np.testing.assert_array_equal(prepared.train_data.labels, source.labels[prepared.split.train])
    assert prepared.config.model.num_classes == 10 and prepared.config.model.image_mean != (
        0.5,
        0.5,
        0.5,
    )
    assert prepared.word_vectors.shape == (10, 12)
    everything = prepare_run(digits_config(), source, "auto", word_vectors="orthogonal")
    assert everything.split is None and len(everything.train_data.labels) == 1797
    with pytest.raises(ValueError, match="--word-vectors"):
        prepare_run(digits_config(), source, "all")
    with pytest.raises(ValueError, match="split must be one of"):
        prepare_run(digits_config(), source, "random", word_vectors="orthogonal")


def test_a_refused_run_writes_nothing(tmp_path):
    """A run that is refused (the folder holds a run; a resume with another split) leaves the
    old run's split.json as it was."""
    source = load_source("digits")
    config = digits_config(epochs=1)
    first = prepare_run(config, source, "per-class", 20, 5, 0, "orthogonal")
    train_run(first, tmp_path, **QUIET)
    saved = (tmp_path / "split.json").read_text()
    other = prepare_run(config, source, "per-class", 20, 5, 1, "orthogonal")  # other seed
    with pytest.raises(ValueError, match="already holds a training run"):
        train_run(other, tmp_path, **QUIET)
    assert (tmp_path / "split.json").read_text() == saved
    with pytest.raises(ValueError, match="holds another split"):
        train_run(other, tmp_path, resume=True, **QUIET)
    assert (tmp_path / "split.json").read_text() == saved
    assert Split.load(tmp_path / "split.json") == first.split


def test_the_demo_scores_its_own_codes(tmp_path):
    result = run_demo(
        tmp_path, epochs=2, train_per_class=30, query_per_class=5, num_levels=2, dim=16, **QUIET
    )
    assert result.split == {"train": 300, "query": 50, "database": 1447, "seed": 0}
    assert list(result.evaluation.map_by_bits) == [8, 16]
    # recompute the 16-bit mAP from the saved model, independently of the evaluation code
    model = DPQModel.from_checkpoint(tmp_path / "model")
    split = Split.load(tmp_path / "split.json")
    source = load_source("digits")
    index = DPQIndex(model.codebooks(), search_mode=model.config.model.search_mode)
    index.add(model.encode(source.inputs[split.database]))
    _, ids = index.search(model.extract_features(source.inputs[split.query]), len(split.database))
    expected = map_at_r(ids, source.labels[split.query], source.labels[split.database])
    assert result.evaluation.map_by_bits[16] == pytest.approx(expected, abs=1e-12)
    assert json.loads(json.dumps(result.to_dict()))["evaluation"]["map"]["16"] == pytest.approx(
        expected
    )


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
        tmp_path / "run",
        data=small,
        base_config=recipe,
        epochs=1,
        word_vectors=WORDVEC / "cifar10.txt",
        train_per_class=8,
        query_per_class=2,
        split_seed=4,
        **QUIET,
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
        tmp_path / "run",
        data=_small_cifar(tmp_path, train=3, test=1),
        base_config=recipe,
        epochs=1,
        word_vectors=WORDVEC / "cifar10.txt",
        train_per_class=2,
        query_per_class=1,
        device="cpu",
        **QUIET,
    )
    config = result.train.model.config
    assert config.model.image_size == 227 and config.model.backbone == "alexnet"
    assert set(result.evaluation.map_by_bits) == {3, 6, 9, 12}
    assert result.evaluation.num_database == 10
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["train"]["schedule"] == "end_to_end"
