"""dpq.evaluate.workflows: the evaluations of `dpq evaluate` equal the same evaluation put
together by hand from dpq.evaluate.retrieval, on saved features (with a DPQ or a binary
index) and on a model's split (DPQ, or another method)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import digits_config
from dpq.data import load_source, split_per_class
from dpq.evaluate.feature_set import FEATURE_FILES, FeatureSet
from dpq.evaluate.metrics import map_at_r
from dpq.evaluate.retrieval import evaluate_methods, evaluate_retrieval
from dpq.evaluate.rows import baseline_methods, dpq_methods, float_method
from dpq.evaluate.workflows import evaluate_checkpoint, evaluate_feature_files, evaluate_split
from dpq.index import DPQIndex
from dpq.index.binary import BinaryIndex, sign_codes
from dpq.methods import method_for
from dpq.model.network import DPQModel


def _files(directory, train: bool = True) -> dict:
    names = FEATURE_FILES if train else {k: v for k, v in FEATURE_FILES.items() if "train" not in k}
    return {key: directory / name for key, name in names.items()}


def test_saved_features_equal_the_methods_put_together_by_hand(feature_dir):
    evaluation = evaluate_feature_files(
        _files(feature_dir),
        ["dpq", "pq", "float", "pq"],
        bits=[8, 16],
        index=feature_dir / "index.npz",
        seed=3,
        progress=False,
    )
    features = FeatureSet.from_directory(feature_dir)
    index = DPQIndex.load(feature_dir / "index.npz")
    methods = dpq_methods(index, [8, 16], 870, 16) + baseline_methods(["pq"], [8, 16], features, 3)
    expected = evaluate_methods(features, [*methods, float_method(features)], progress=False)
    assert [(r.method, r.bits) for r in evaluation.results] == [
        ("dpq", 8), ("dpq", 16), ("pq", 8), ("pq", 16), ("float", 512)
    ]  # fmt: skip
    assert evaluation.map_table() == expected.map_table()
    assert evaluation.float_reference() == expected.float_reference()
    assert evaluation.fitted_on == "train"


def test_an_inner_product_index_makes_inner_product_the_default_metric(feature_dir, tmp_path):
    index = DPQIndex.load(feature_dir / "index.npz")
    index.search_mode = "ip"
    ip_index = index.save(tmp_path / "ip.npz")

    def float_search(**options) -> str:
        evaluation = evaluate_feature_files(
            _files(feature_dir), ["float"], bits=[8], progress=False, **options
        )
        return evaluation.results[0].settings["search"]

    assert float_search(index=ip_index) == "exhaustive inner product on float32 features"
    assert float_search(index=ip_index, metric="l2") == "exhaustive squared L2 on float32 features"
    assert float_search() == "exhaustive squared L2 on float32 features"


def test_saved_features_are_checked(feature_dir):
    with pytest.raises(ValueError, match="needs a DPQ index"):
        evaluate_feature_files(_files(feature_dir), ["dpq"], progress=False)
    with pytest.raises(ValueError, match="no method to evaluate"):
        evaluate_feature_files(_files(feature_dir), [], progress=False)
    evaluation = evaluate_feature_files(_files(feature_dir, train=False), ["lsh"], [8], r=5000,
                                        progress=False)  # fmt: skip
    assert evaluation.fitted_on == "database" and evaluation.r == 870
    assert any("larger than the database" in note for note in evaluation.notes)


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """An untrained seeded digits model saved as a checkpoint, and a split of the digits."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("workflows")
    DPQModel(digits_config()).save_checkpoint(folder / "model")
    split = split_per_class(load_source("digits").labels, 5, 3, seed=1)
    split.save(folder / "split.json")
    return folder


def test_a_split_evaluation_searches_its_query_rows_in_its_database_rows(digits_model):
    model = DPQModel.from_checkpoint(digits_model / "model")
    source = load_source("digits")
    split = split_per_class(source.labels, 5, 3, seed=1)
    evaluation = evaluate_split(model, source, split, baselines=["lsh"], progress=False)
    assert (evaluation.num_queries, evaluation.num_database) == (30, 1797 - 80)
    query, database = source.rows(split.query), source.rows(split.database)
    expected = evaluate_retrieval(model, *query, *database, progress=False)
    assert evaluation.map_by_bits == expected.map_by_bits
    assert evaluation.float_map == expected.float_map
    assert evaluation.details.fitted_on == "train"  # lsh fitted on the split's 50 training rows
    assert evaluation.details.results[-2].settings["fitted_on_rows"] == 50


def test_a_checkpoint_evaluation_loads_model_split_and_source(digits_model):
    evaluation = evaluate_checkpoint(
        digits_model / "model", "digits", digits_model / "split.json", device="cpu",
        progress=False, in_memory=True,
    )  # fmt: skip
    model = DPQModel.from_checkpoint(digits_model / "model")
    source = load_source("digits")
    split = split_per_class(source.labels, 5, 3, seed=1)
    expected = evaluate_split(model, source, split, curves=True, progress=False)
    assert evaluation.map_by_bits == expected.map_by_bits
    assert set(evaluation.map_by_bits) == {4, 8}  # 2 levels of 16 codewords
    curves = evaluation.details.results[1]
    assert curves.pr is not None and curves.precision_at is not None
    with pytest.raises(FileNotFoundError):
        evaluate_checkpoint(digits_model / "model", "digits", digits_model / "absent.json",
                            device="cpu", progress=False)  # fmt: skip
    assert np.isfinite(evaluation.float_map)


def test_a_binary_index_file_is_evaluated_by_the_signs_of_the_query_features(feature_dir, tmp_path):
    """The rows of a binary index, named as asked ("sign"), at its one length among --bits;
    the baselines at every length; the mAP that of a Hamming ranking of the sign bits."""
    features = FeatureSet.from_directory(feature_dir)
    index = BinaryIndex(16)
    index.add(sign_codes(features.db_features))
    path = index.save(tmp_path / "sign.npz")
    evaluation = evaluate_feature_files(
        _files(feature_dir), ["sign", "lsh"], bits=[8, 16], index=path, progress=False
    )
    assert [(r.method, r.bits) for r in evaluation.results] == [
        ("sign", 16), ("lsh", 8), ("lsh", 16)
    ]  # fmt: skip
    query, database = features.query_features > 0, features.db_features > 0
    ranking = np.argsort((query[:, None] != database[None]).sum(2), axis=1, kind="stable")
    expected = map_at_r(ranking, features.query_labels, features.db_labels)
    assert evaluation.map_table()["sign"][16] == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="holds 16-bit codes; ask for --bits 16"):
        evaluate_feature_files(_files(feature_dir), ["sign"], [8], index=path, progress=False)


def test_a_sign_checkpoint_is_evaluated_at_its_length(tmp_path):
    torch.manual_seed(0)
    config = digits_config().replace(method={"name": "sign", "bits": 8})
    method_for(config).build_network().save_checkpoint(tmp_path / "model")
    split = split_per_class(load_source("digits").labels, 5, 3, seed=1)
    split.save(tmp_path / "split.json")
    evaluation = evaluate_checkpoint(
        tmp_path / "model", "digits", tmp_path / "split.json", device="cpu", progress=False
    )
    assert list(evaluation.map_by_bits) == [8] and evaluation.method == "sign"
    assert evaluation.details.results[0].pr is not None  # curves at its one length
