"""dpq.training.experiments: prepare_run, train_run (checks before writes), train_from_source
with any method, and the demo, checked against an independent recomputation of its numbers
(the CIFAR-10 reproduction: tests/test_reproduce.py)."""

import json

import numpy as np
import pytest

from conftest import QUIET, digits_config, feature_config, feature_data
from dpq.data import SourceSpec, Split, load_source
from dpq.evaluate.metrics import map_at_r
from dpq.index import DPQIndex
from dpq.methods import load_network
from dpq.methods.binary_sketch import SignHashNetwork
from dpq.model.network import DPQModel
from dpq.training.experiments import (
    RunSettings,
    SplitSettings,
    prepare_run,
    run_demo,
    train_from_source,
    train_run,
)


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
    train_run(first, RunSettings(tmp_path, **QUIET))
    saved = (tmp_path / "split.json").read_text()
    other = prepare_run(config, source, "per-class", 20, 5, 1, "orthogonal")  # other seed
    with pytest.raises(ValueError, match="already holds a training run"):
        train_run(other, RunSettings(tmp_path, **QUIET))
    assert (tmp_path / "split.json").read_text() == saved
    with pytest.raises(ValueError, match="holds another split"):
        train_run(other, RunSettings(tmp_path, resume=True, **QUIET))
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


def test_train_from_source_trains_any_method_and_checks_it_before_loading(tmp_path):
    """A "sign" model from a features file: no word vectors asked for, its checkpoint loads
    through dpq.methods.load_network; a method's bad settings are said before the source is
    read or the folder written."""
    data = feature_data(n=120)
    np.save(tmp_path / "x.npy", data.images)
    np.save(tmp_path / "y.npy", data.labels)
    source = SourceSpec(features=str(tmp_path / "x.npy"), labels=str(tmp_path / "y.npy"))
    config = feature_config(epochs=2).replace(method={"name": "sign", "bits": 16})
    result = train_from_source(config, source, RunSettings(tmp_path / "run", **QUIET))
    assert result.epochs == 2 and not (tmp_path / "run" / "split.json").exists()  # split "all"
    network = load_network(tmp_path / "run" / "model")
    assert isinstance(network, SignHashNetwork) and network.config.method.bits == 16
    bad = config.replace(method={"bits": 12})
    missing = SourceSpec(features=str(tmp_path / "absent.npy"), labels=str(tmp_path / "y.npy"))
    with pytest.raises(ValueError, match="a multiple of 8"):
        train_from_source(bad, missing, RunSettings(tmp_path / "bad", **QUIET))
    assert not (tmp_path / "bad").exists()
    per_class = SplitSettings("per-class", train_per_class=20, query_per_class=5, seed=1)
    train_from_source(config, source, RunSettings(tmp_path / "split", **QUIET), per_class)
    assert Split.load(tmp_path / "split" / "split.json").sizes["train"] == 60


def test_a_method_without_word_vectors_is_prepared_without_them():
    source = load_source("digits")
    config = digits_config().replace(method={"name": "sign", "bits": 8})
    prepared = prepare_run(config, source, "per-class", 20, 5, 3)
    assert prepared.word_vectors is None and len(prepared.train_data.labels) == 200
