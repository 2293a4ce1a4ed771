"""dpq.evaluate.rows: the rows of an index of either kind (checked against it), a trained
model's rows searched by its method, and exact float search with its tie rule."""

import numpy as np
import pytest
import torch

from conftest import feature_config, feature_data
from dpq.evaluate.rows import (
    ExactSearcher,
    MethodSearcher,
    binary_methods,
    dpq_methods,
    index_methods,
    method_rows,
)
from dpq.index import DPQIndex
from dpq.index.binary import BinaryIndex, sign_codes
from dpq.methods import method_for


def test_dpq_rows_are_checked_against_the_index(feature_dir):
    index = DPQIndex.load(feature_dir / "index.npz")
    assert [m.bits for m in dpq_methods(index)] == [8, 16]
    with pytest.raises(ValueError, match="not one of them"):
        dpq_methods(index, [12])
    with pytest.raises(ValueError, match="holds 870 items but there are 30"):
        dpq_methods(index, [8], n_database=30)
    with pytest.raises(ValueError, match="dimension 16 but the query features have 8"):
        dpq_methods(index, [8], dim=8)


def test_exact_searcher_orders_ties_by_id_and_pads_missing():
    database = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
    distances, ids = ExactSearcher(database, "l2").search(np.array([[1.0, 0.0]], np.float32), 4)
    assert ids.tolist() == [[0, 2, 1, -1]] and np.isinf(distances[0, 3])
    distances, ids = ExactSearcher(database, "ip").search(np.array([[1.0, 0.0]], np.float32), 2)
    assert ids.tolist() == [[0, 2]] and distances.tolist() == [[-1.0, -1.0]]


def _binary(bits: int = 16, n: int = 30) -> tuple[BinaryIndex, np.ndarray]:
    features = np.random.default_rng(0).normal(size=(n, bits)).astype(np.float32)
    index = BinaryIndex(bits)
    index.add(sign_codes(features))
    return index, features


def test_a_binary_index_gives_one_row_at_its_length_searched_by_the_signs():
    index, features = _binary()
    (row,) = binary_methods(index, [8, 16, 24], n_database=30, dim=16, name="sign")
    assert (row.name, row.bits) == ("sign", 16)
    prepared = row.prepare()
    assert prepared.settings == {
        "name": "sign",
        "bits": 16,
        "search": "Hamming distance (faiss IndexBinaryFlat)",
    }
    distances, ids = prepared.searcher.search(features[:4], 30)
    np.testing.assert_array_equal(ids, index.search(sign_codes(features[:4]), 30)[1])
    assert (ids[:, 0] == np.arange(4)).all() and (distances[:, 0] == 0).all()
    with pytest.raises(ValueError, match="holds 16-bit codes; ask for --bits 16"):
        binary_methods(index, [8, 32])
    with pytest.raises(ValueError, match="binary index holds 30 items but there are 31"):
        binary_methods(index, n_database=31)
    with pytest.raises(ValueError, match="dimension 16 but the query features have 12"):
        binary_methods(index, dim=12)


def test_index_rows_follow_the_kind_of_the_index(feature_dir):
    dpq = DPQIndex.load(feature_dir / "index.npz")
    assert [(m.name, m.bits) for m in index_methods(dpq, "dpq")] == [("dpq", 8), ("dpq", 16)]
    binary, _ = _binary()
    assert [(m.name, m.bits) for m in index_methods(binary, "x")] == [("x", 16)]


@pytest.mark.parametrize(
    "method", [{"name": "dpq"}, {"name": "sign", "bits": 16}], ids=["dpq", "sign"]
)
def test_a_trained_models_rows_are_its_code_lengths_searched_by_its_method(method):
    config = feature_config().replace(method=method)
    torch.manual_seed(0)
    model_method = method_for(config)
    network = model_method.build_network().eval()
    features = network.extract_features(feature_data().images)
    index = model_method.new_index(network)
    index.add(model_method.encode(network, features))
    rows = method_rows(model_method, index, encode_seconds=1.5)
    assert [row.bits for row in rows] == list(model_method.code_lengths())
    for row in rows:
        prepared = row.prepare()
        assert isinstance(prepared.searcher, MethodSearcher) and prepared.encode_seconds == 1.5
        assert row.name == prepared.settings["name"] == method["name"]
        expected = model_method.search(index, features[:5], 9, bits=row.bits)
        found = prepared.searcher.search(features[:5], 9)
        np.testing.assert_array_equal(found[1], expected[1])
